//! The properties every input must have, checked one command at a time.
//!
//! # Reader inputs
//!
//! [`check_reader`] runs, on one trace directory, what each reader
//! command of the CLI runs, each as one *step*:
//!
//! | step           | what                                                              |
//! |----------------|-------------------------------------------------------------------|
//! | `open`         | `Trace::open`, every thread's records, `Trace::merged`            |
//! | `open-salvage` | the same with `allow_incomplete` (`--salvage`)                    |
//! | `report`       | `TraceSet::open` (children too), `analysis::report`, its JSON      |
//! | `replay`       | `analysis::replay`                                                |
//! | `folded`       | `analysis::folded_to`                                             |
//! | `flamegraph`   | `analysis::flamegraph`                                            |
//! | `chrome`       | `analysis::chrome`                                                |
//! | `perfetto`     | the CLI's `dump --perfetto` exporter (its source, compiled here)  |
//! | `stacks`       | every thread through `Rebuilder`, its events checked to nest      |
//!
//! The analyses open with `allow_incomplete` (a superset of what opens
//! without it) and write into `io::sink()`. For each step:
//!
//! - **no panic**: it runs under `catch_unwind`; a panic is a finding
//!   with its message and place;
//! - **time**: the thread's CPU time (not the wall clock: the machine is
//!   shared) stays under [`Limits::seconds`];
//! - **memory**: the most heap the thread held during the step, measured
//!   by the counting allocator ([`crate::alloc`]), stays under
//!   [`Limits::bytes`];
//! - **errors name the trace**: an error's message is not empty and holds
//!   the directory's path (the messages name the file inside it, or the
//!   directory for what is wrong in the metadata);
//! - **what open accepts reads back**: once a trace (or trace set) opened,
//!   reading its records or analysing it never fails with a reader error
//!   (the files did not change), and each thread's event times never go
//!   backwards;
//! - **stacks nest**: the rebuilt `Enter`/`Leave` events nest, as the
//!   analysis module documents "even for damaged input": every `Leave`
//!   closes the latest open `Enter` (same function, level and start), no
//!   call is open at a gap or at the end of a thread, self time never
//!   exceeds total time.
//!
//! With `validate` (small inputs), the outputs are made again into memory
//! and checked: the Chrome and report JSON parse, the Perfetto trace
//! parses as a protobuf `Trace`, replay and folded output hold no control
//! characters but newlines (names are escaped), each folded line ends
//! with a count.
//!
//! # Control lines
//!
//! [`check_control`]: `Request::parse_bytes` never panics and gives a
//! request or an error with a non-empty, one-line message of bounded
//! length; a request written back with `to_line` parses to itself; a reply
//! carrying the message and the glob reads back as sent
//! (`Reply::to_text`, `Reply::read`); for `enable`/`disable`, the glob's
//! filter and its "did you mean" hints (`control::close_names`) over a
//! program's worth of function names take bounded time.

use crate::alloc::Measure;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::Instant;
use textpoke_analysis::{
    self as analysis, AnalysisError, Event, FlameOptions, Rebuilder, ReplayOptions, ReportOptions, TraceSet,
};
use textpoke_record::tracedata::{OpenOptions, RecordKind, Trace};

/// Bounds for one step.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// CPU seconds.
    pub seconds: f64,
    /// Peak heap bytes.
    pub bytes: u64,
    /// Allocations beyond this many bytes fail (the process aborts): a
    /// memory bomb stops here rather than take the machine.
    pub cap: Option<u64>,
}

impl Limits {
    /// The issue's bounds, "2 s and 200 MB on any input derived from a
    /// 10 MB trace", as a rate: 200 ns and 20 bytes per input byte, for
    /// an input of `size` bytes counted as at least `floor` bytes (fixed
    /// costs), times `slowdown` for the time (an unoptimised build).
    pub fn scaled(size: u64, floor: u64, slowdown: f64) -> Limits {
        let size = size.max(floor);
        let seconds = 2.0 * size as f64 / 10e6 * slowdown;
        Limits { seconds, bytes: size.saturating_mul(20), cap: None }
    }
}

/// What went wrong.
#[derive(Clone, Debug, PartialEq)]
pub enum Problem {
    Panic(String),
    Slow {
        seconds: f64,
        limit: f64,
    },
    Memory {
        bytes: u64,
        limit: u64,
    },
    /// An error message that does not say which trace.
    Unnamed(String),
    /// Open accepted what reading then refused, or times went back.
    Inconsistent(String),
    /// The rebuilt stacks do not nest.
    Nesting(String),
    /// An output that is not what it claims to be.
    BadOutput(String),
    /// A control-protocol property.
    Control(String),
}

impl Problem {
    /// A short name for file names and grouping.
    pub fn kind(&self) -> &'static str {
        match self {
            Problem::Panic(_) => "panic",
            Problem::Slow { .. } => "slow",
            Problem::Memory { .. } => "memory",
            Problem::Unnamed(_) => "unnamed-error",
            Problem::Inconsistent(_) => "inconsistent",
            Problem::Nesting(_) => "nesting",
            Problem::BadOutput(_) => "bad-output",
            Problem::Control(_) => "control",
        }
    }
}

/// A problem in one step.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub step: &'static str,
    pub problem: Problem,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.problem {
            Problem::Slow { seconds, limit } => {
                write!(f, "{}: slow: {seconds:.3} s of CPU, the limit is {limit:.3} s", self.step)
            }
            Problem::Memory { bytes, limit } => {
                write!(f, "{}: memory: {} MB at peak, the limit is {} MB", self.step, bytes >> 20, limit >> 20)
            }
            Problem::Panic(m)
            | Problem::Unnamed(m)
            | Problem::Inconsistent(m)
            | Problem::Nesting(m)
            | Problem::BadOutput(m)
            | Problem::Control(m) => write!(f, "{}: {}: {m}", self.step, self.problem.kind()),
        }
    }
}

/// One step's figures.
#[derive(Clone, Debug)]
pub struct Step {
    pub name: &'static str,
    pub cpu: f64,
    pub wall: f64,
    pub peak: u64,
    /// The error it ended with, if any (`None`: success).
    pub error: Option<String>,
}

/// Everything one input did.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub steps: Vec<Step>,
    pub findings: Vec<Finding>,
}

impl Outcome {
    /// The step called `name`.
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }
}

thread_local! {
    /// The last panic of a checked step on this thread.
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };

    /// Whether this thread is inside a checked step (its panics are
    /// findings, not failures of the program).
    static CHECKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes panics inside a checked step quiet and remembered (message and
/// place) for the step that caught them; other panics go to the hook that
/// was there before. Call once, before checking.
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(install);
}

fn install() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !CHECKING.with(std::cell::Cell::get) {
            return previous(info);
        }
        let msg = match info.payload().downcast_ref::<&str>() {
            Some(s) => (*s).to_string(),
            None => info.payload().downcast_ref::<String>().cloned().unwrap_or_else(|| "(no message)".into()),
        };
        let place = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("{msg} at {place}")));
    }));
}

/// CPU seconds this thread has used.
pub fn thread_cpu() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Runs `f` as the step `name`: catches a panic, measures, checks the
/// bounds, and checks that an error names `dir`.
fn step<T>(
    out: &mut Outcome,
    name: &'static str,
    limits: &Limits,
    dir: &str,
    f: impl FnOnce(&mut Vec<Finding>) -> Result<T, String>,
) -> Option<T> {
    let mut inner = Vec::new();
    let m = Measure::start(limits.cap);
    let (c0, w0) = (thread_cpu(), Instant::now());
    CHECKING.with(|c| c.set(true));
    let r = catch_unwind(AssertUnwindSafe(|| f(&mut inner)));
    CHECKING.with(|c| c.set(false));
    let (cpu, wall) = (thread_cpu() - c0, w0.elapsed().as_secs_f64());
    let peak = m.peak();
    drop(m);
    let mut problems: Vec<Problem> = Vec::new();
    let (value, error) = match r {
        Ok(Ok(v)) => (Some(v), None),
        Ok(Err(e)) => {
            if e.trim().is_empty() || !e.contains(dir) {
                problems.push(Problem::Unnamed(e.clone()));
            }
            (None, Some(e))
        }
        Err(_) => {
            let msg = LAST_PANIC.with(|p| p.borrow_mut().take()).unwrap_or_else(|| "(unknown)".into());
            problems.push(Problem::Panic(msg.clone()));
            (None, Some(format!("panic: {msg}")))
        }
    };
    if cpu > limits.seconds {
        problems.push(Problem::Slow { seconds: cpu, limit: limits.seconds });
    }
    if peak > limits.bytes {
        problems.push(Problem::Memory { bytes: peak, limit: limits.bytes });
    }
    out.findings.extend(inner);
    out.findings.extend(problems.into_iter().map(|problem| Finding { step: name, problem }));
    out.steps.push(Step { name, cpu, wall, peak, error });
    value
}

/// Reads every record of every thread, then the merged stream; an error
/// here, after a successful open, is an inconsistency.
fn read_all(t: &Trace, findings: &mut Vec<Finding>, step: &'static str) -> u64 {
    let mut n = 0u64;
    let mut bad = |what: String| findings.push(Finding { step, problem: Problem::Inconsistent(what) });
    for th in t.threads() {
        let mut last_event: Option<u64> = None;
        match t.records(th) {
            Err(e) => bad(format!("open accepted the trace, reading thread {} failed: {e}", th.tid())),
            Ok(it) => {
                for r in it {
                    match r {
                        Ok(r) => {
                            n += 1;
                            if matches!(r.kind, RecordKind::Entry | RecordKind::Exit) {
                                if last_event.is_some_and(|l| r.ts < l) {
                                    bad(format!(
                                        "thread {}: time goes back to {} after {last_event:?}",
                                        th.tid(),
                                        r.ts
                                    ));
                                    break;
                                }
                                last_event = Some(r.ts);
                            }
                        }
                        Err(e) => {
                            bad(format!("open accepted the trace, reading thread {} failed: {e}", th.tid()));
                            break;
                        }
                    }
                }
            }
        }
    }
    match t.merged() {
        Err(e) => bad(format!("open accepted the trace, merging failed: {e}")),
        Ok(it) => {
            let mut m = 0u64;
            for r in it {
                match r {
                    Ok(_) => m += 1,
                    Err(e) => {
                        bad(format!("open accepted the trace, merging failed: {e}"));
                        return n;
                    }
                }
            }
            if m != n {
                bad(format!("the merged stream has {m} records, the threads {n}"));
            }
        }
    }
    n
}

fn analysis_error(e: AnalysisError, opened: bool, step: &'static str, findings: &mut Vec<Finding>) -> String {
    let msg = e.to_string();
    if opened && matches!(e, AnalysisError::Trace(_)) {
        let what = format!("the trace set opened, the analysis then failed reading it: {msg}");
        findings.push(Finding { step, problem: Problem::Inconsistent(what) });
    }
    msg
}

fn open_set(dir: &Path) -> Result<TraceSet, String> {
    TraceSet::open(dir, OpenOptions { allow_incomplete: true }).map_err(|e| e.to_string())
}

/// A writer that keeps at most `cap` bytes, then fails.
struct Capped {
    data: Vec<u8>,
    cap: usize,
}

impl Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.data.len() + b.len() > self.cap {
            return Err(std::io::Error::other("output over the validation cap"));
        }
        self.data.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const VALIDATE_CAP: usize = 64 << 20;

fn control_chars(text: &[u8], allowed: &[u8]) -> Option<String> {
    let s = match std::str::from_utf8(text) {
        Ok(s) => s,
        Err(e) => return Some(format!("not UTF-8 at byte {}", e.valid_up_to())),
    };
    s.char_indices()
        .find(|&(_, c)| c.is_control() && !(c.is_ascii() && allowed.contains(&(c as u8))))
        .map(|(i, c)| format!("control character U+{:04X} at byte {i}", c as u32))
}

/// Makes the outputs again into memory and checks them (module docs).
fn validate(dir: &Path, findings: &mut Vec<Finding>) {
    let Ok(set) = open_set(dir) else { return };
    let mut bad = |step: &'static str, what: String| findings.push(Finding { step, problem: Problem::BadOutput(what) });
    let mut w = Capped { data: Vec::new(), cap: VALIDATE_CAP };
    if let Ok(r) = analysis::report(&set, &ReportOptions::default(), &mut |_| {}) {
        match serde_json::to_vec(&r).map(|j| serde_json::from_slice::<serde_json::Value>(&j)) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bad("report", format!("the report's JSON does not parse: {e}")),
            Err(e) => bad("report", format!("the report does not serialise: {e}")),
        }
    }
    if analysis::replay(&set, &ReplayOptions::default(), &mut w, &mut |_| {}).is_ok() {
        if let Some(what) = control_chars(&w.data, b"\n") {
            bad("replay", format!("replay output: {what}"));
        }
    }
    w.data.clear();
    if analysis::folded_to(&set, &mut w, &mut |_| {}).is_ok() {
        let folded = String::from_utf8_lossy(&w.data);
        if let Some(what) = control_chars(folded.as_bytes(), b"\n") {
            bad("folded", format!("folded output: {what}"));
        }
        if let Some(l) = folded.lines().find(|l| l.rsplit_once(' ').is_none_or(|(_, n)| n.parse::<u64>().is_err())) {
            bad("folded", format!("folded line without a count: {l:?}"));
        }
    }
    w.data.clear();
    if analysis::flamegraph(&set, &FlameOptions::default(), &mut w, &mut |_| {}).is_ok() {
        if let Some(what) = control_chars(&w.data, b"\n\t\r") {
            bad("flamegraph", format!("SVG: {what}"));
        }
    }
    w.data.clear();
    if analysis::chrome(&set, &mut w, &mut |_| {}).is_ok() {
        match serde_json::from_slice::<serde_json::Value>(&w.data) {
            Ok(v) if v["traceEvents"].is_array() => {}
            Ok(_) => bad("chrome", "the Chrome JSON has no traceEvents array".into()),
            Err(e) => bad("chrome", format!("the Chrome JSON does not parse: {e}")),
        }
    }
    w.data.clear();
    if crate::perfetto::perfetto(&set, &mut w, &mut |_| {}).is_ok() {
        use protobuf::Message;
        if let Err(e) = perfetto_protos::trace::Trace::parse_from_bytes(&w.data) {
            bad("perfetto", format!("the Perfetto trace does not parse: {e}"));
        }
    }
}

/// Checks that the rebuilt events of every thread nest (module docs).
fn check_stacks(set: &TraceSet, findings: &mut Vec<Finding>) -> Result<(), String> {
    for p in &set.processes {
        if p.trace.mode() == textpoke_record::Mode::Count {
            continue;
        }
        let mut rb = Rebuilder::new(p.trace.clock());
        for t in p.trace.threads() {
            let mut open: Vec<(textpoke_record::FuncId, usize, u64)> = Vec::new();
            let mut problem: Option<String> = None;
            let mut check = |e: Event| {
                if problem.is_some() {
                    return;
                }
                match e {
                    Event::Enter { func, level, ts } => open.push((func, level, ts)),
                    Event::Leave(c) => match open.pop() {
                        Some((f, l, s)) if f == c.func && l == c.level && s == c.start => {
                            if c.self_ns > c.total_ns {
                                problem =
                                    Some(format!("a call's self time {} exceeds its total {}", c.self_ns, c.total_ns));
                            }
                        }
                        top => problem = Some(format!("Leave {c:?} does not close the open call {top:?}")),
                    },
                    Event::Gap { .. } if !open.is_empty() => {
                        problem = Some(format!("a gap with {} call(s) still open", open.len()))
                    }
                    _ => {}
                }
            };
            analysis::walk_thread(&p.trace, t, &mut rb, &mut |_| {}, &mut check).map_err(|e| e.to_string())?;
            if problem.is_none() && !open.is_empty() {
                problem = Some(format!("{} call(s) still open at the end of the thread", open.len()));
            }
            if let Some(what) = problem {
                let what = format!("{}: thread {}: {what}", p.trace.dir().display(), t.tid());
                findings.push(Finding { step: "stacks", problem: Problem::Nesting(what) });
            }
        }
    }
    Ok(())
}

/// Checks one trace directory (module docs). `validate`: also check the
/// outputs (small inputs: they are made again, into memory).
pub fn check_reader(dir: &Path, limits: &Limits, validate_outputs: bool) -> Outcome {
    let mut out = Outcome::default();
    let d = dir.display().to_string();
    let sink = &mut std::io::sink();
    step(&mut out, "open", limits, &d, |f| {
        let t = Trace::open(dir).map_err(|e| e.to_string())?;
        read_all(&t, f, "open");
        Ok(())
    });
    step(&mut out, "open-salvage", limits, &d, |f| {
        let t = Trace::open_with(dir, OpenOptions { allow_incomplete: true }).map_err(|e| e.to_string())?;
        read_all(&t, f, "open-salvage");
        Ok(())
    });
    step(&mut out, "report", limits, &d, |f| {
        let set = open_set(dir)?;
        let r = analysis::report(&set, &ReportOptions::default(), &mut |_| {})
            .map_err(|e| analysis_error(e, true, "report", f))?;
        analysis::to_json_writer_pretty(&mut *sink, &r).map_err(|e| e.to_string())
    });
    step(&mut out, "replay", limits, &d, |f| {
        let set = open_set(dir)?;
        analysis::replay(&set, &ReplayOptions::default(), &mut *sink, &mut |_| {})
            .map_err(|e| analysis_error(e, true, "replay", f))
    });
    step(&mut out, "folded", limits, &d, |f| {
        let set = open_set(dir)?;
        analysis::folded_to(&set, &mut *sink, &mut |_| {}).map(drop).map_err(|e| analysis_error(e, true, "folded", f))
    });
    step(&mut out, "flamegraph", limits, &d, |f| {
        let set = open_set(dir)?;
        analysis::flamegraph(&set, &FlameOptions::default(), &mut *sink, &mut |_| {})
            .map_err(|e| analysis_error(e, true, "flamegraph", f))
    });
    step(&mut out, "chrome", limits, &d, |f| {
        let set = open_set(dir)?;
        analysis::chrome(&set, &mut *sink, &mut |_| {}).map(drop).map_err(|e| analysis_error(e, true, "chrome", f))
    });
    step(&mut out, "perfetto", limits, &d, |f| {
        let set = open_set(dir)?;
        crate::perfetto::perfetto(&set, &mut *sink, &mut |_| {})
            .map(drop)
            .map_err(|e| analysis_error(e, true, "perfetto", f))
    });
    step(&mut out, "stacks", limits, &d, |f| {
        let set = open_set(dir)?;
        check_stacks(&set, f).inspect_err(|e| {
            let what = format!("the trace set opened, walking it then failed: {e}");
            f.push(Finding { step: "stacks", problem: Problem::Inconsistent(what) });
        })
    });
    if validate_outputs {
        let mut findings = Vec::new();
        CHECKING.with(|c| c.set(true));
        let r = catch_unwind(AssertUnwindSafe(|| validate(dir, &mut findings)));
        CHECKING.with(|c| c.set(false));
        if r.is_err() {
            let msg = LAST_PANIC.with(|p| p.borrow_mut().take()).unwrap_or_default();
            findings.push(Finding { step: "validate", problem: Problem::Panic(msg) });
        }
        out.findings.extend(findings);
    }
    out
}

// ---------------------------------------------------------------------------
// Control lines.

/// A program's worth of function names for the glob and hint checks:
/// `n` names, C, C++ and Rust shaped, some long, deterministic.
pub fn function_names(n: usize) -> Vec<String> {
    let mut rng = crate::rng::Rng::new(0x6e61_6d65);
    let words = ["parse", "read", "write", "node", "tree", "alloc", "free", "init", "run", "work", "hash", "lookup"];
    (0..n)
        .map(|i| {
            let a = rng.pick(&words);
            let b = rng.pick(&words);
            match i % 4 {
                0 => format!("{a}_{b}_{i}"),
                1 => format!("ns{}::{a}<std::vector<{b}, std::allocator<{b}> > >::{b}(int, char const*) const", i % 97),
                2 => format!("<{a}::{b}::Thing{i} as core::ops::Drop>::drop"),
                _ => format!("{a}{}", "x".repeat(rng.len_upto(300))),
            }
        })
        .collect()
}

/// The longest error message a request may get: it goes back in one line.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// Checks one request line (module docs). `names`: see
/// [`function_names`].
pub fn check_control(line: &[u8], names: &[String], limits: &Limits) -> Outcome {
    use textpoke_control::{close_names, ControlError, Reply, Request};
    let mut out = Outcome::default();
    let ctl = |what: String| Finding { step: "control", problem: Problem::Control(what) };
    step(&mut out, "control", limits, "", |f| {
        match Request::parse_bytes(line) {
            Ok(req) => {
                let back = Request::parse_bytes(req.to_line().as_bytes());
                if back.as_ref().ok() != Some(&req) {
                    f.push(ctl(format!("{req:?} written as {:?} parses as {back:?}", req.to_line())));
                }
                if let Request::Enable(g) | Request::Disable(g) = &req {
                    if g.is_empty() {
                        f.push(ctl("a request with an empty glob".into()));
                    }
                    let reply = Reply::error(format!("no traceable function matches {g:?}")).field("hint", g);
                    let read = Reply::read(&mut std::io::Cursor::new(reply.to_text()));
                    if read.as_ref().ok() != Some(&reply) {
                        f.push(ctl(format!("the reply {reply:?} reads back as {read:?}")));
                    }
                    let filter = textpoke_record::filter::glob_filter([g.as_str()], Vec::<String>::new());
                    if let Ok(filter) = filter {
                        std::hint::black_box(names.iter().filter(|n| filter.matches(n)).count());
                    }
                    std::hint::black_box(close_names(g, names.iter().map(String::as_str), 5));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                let inner = match &e {
                    ControlError::Protocol(m) => m.as_str(),
                    _ => msg.as_str(),
                };
                if inner.trim().is_empty() {
                    f.push(ctl(format!("an error without a message: {msg:?}")));
                }
                if msg.len() > MAX_ERROR_MESSAGE {
                    f.push(ctl(format!("an error message of {} bytes", msg.len())));
                }
                if msg.contains(['\n', '\r']) {
                    f.push(ctl(format!("a multi-line error message: {msg:?}")));
                }
                let reply = Reply::error(msg.clone()).field("hint", String::from_utf8_lossy(line));
                let read = Reply::read(&mut std::io::Cursor::new(reply.to_text()));
                if read.as_ref().ok() != Some(&reply) {
                    f.push(ctl(format!("the reply {reply:?} reads back as {read:?}")));
                }
                return Err(msg);
            }
        }
        Ok(())
    });
    out
}
