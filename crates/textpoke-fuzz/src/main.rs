//! `textpoke-fuzz`: the fuzzer's command line (see the library's
//! documentation for the design, and `USAGE` below for the commands).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use textpoke_fuzz::alloc::Counting;
use textpoke_fuzz::check::{self, Finding, Limits, Outcome};
use textpoke_fuzz::container::TraceInput;
use textpoke_fuzz::rng::Rng;
use textpoke_fuzz::{gen, message_shape, mutate};

#[global_allocator]
static ALLOC: Counting = Counting;

const USAGE: &str = "\
textpoke-fuzz: fuzz textpoke's trace reader and control protocol (stable Rust, in process)

USAGE:
  textpoke-fuzz reader  [OPTIONS]   mutate trace directories, run every reader command on them
  textpoke-fuzz control [OPTIONS]   mutate control-socket request lines, parse and answer them
  textpoke-fuzz check (--reader | --control) FILE...
                                    run the checks on corpus files, print each step's figures
  textpoke-fuzz record DIR [--mb N] [--threads N] [--seed S] [--count-only] [--incomplete] [--lossy] [--fork]
                                    record a trace with the recorder's API (seeds; the 10 MB base)
  textpoke-fuzz pack DIR FILE.tpf   a trace directory into one corpus file
  textpoke-fuzz unpack FILE.tpf DIR a corpus file back into a directory

OPTIONS (reader, control):
  --seconds N      run for N seconds (default 60)
  --inputs N       stop after N inputs
  --seed S         seed of the mutations (default: from the clock; printed)
  --corpus DIR     inputs to start from: *.tpf (reader) or one line per file (control); repeatable
  --out DIR        where findings and new inputs go (default fuzz/out/TARGET)
  --base DIR       reader: a recorded trace directory (the 10 MB trace) to derive inputs from
  --base-share P   reader: the share of inputs derived from --base (default 0.25; 1 with --only-base)
  --only-base      reader: derive every input from --base
  --work DIR       reader: where inputs are written out (default /dev/shm/textpoke-fuzz-PID)
  --keep-if TEXT   also save every input whose mutations mention TEXT (A|B: either) under OUT/kept

Bounds: a command on an input derived from --base gets 2 s of CPU and 200 MB of heap (issue #10);
other inputs the same per byte (200 ns and 20 bytes per byte, counted as at least 256 KiB).
Exit status: 0 if nothing was found, 1 if something was, 2 on usage errors.";

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("textpoke-fuzz: {msg}");
    ExitCode::from(2)
}

#[derive(Default)]
struct Opts {
    seconds: f64,
    inputs: Option<u64>,
    seed: Option<u64>,
    corpus: Vec<PathBuf>,
    out: Option<PathBuf>,
    base: Option<PathBuf>,
    base_share: Option<f64>,
    only_base: bool,
    work: Option<PathBuf>,
    keep_if: Option<String>,
    free: Vec<String>,
    flags: HashSet<String>,
    values: HashMap<String, String>,
}

fn parse_opts(args: &[String], flags: &[&str], values: &[&str]) -> Result<Opts, String> {
    let mut o = Opts { seconds: 60.0, ..Opts::default() };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        let num = |name: &str, v: String| v.parse::<f64>().map_err(|_| format!("{name}: {v:?} is not a number"));
        match a.as_str() {
            "--seconds" => o.seconds = num(a, val(a)?)?,
            "--inputs" => o.inputs = Some(num(a, val(a)?)? as u64),
            "--seed" => {
                let v = val(a)?;
                o.seed = Some(v.parse().map_err(|_| format!("--seed: {v:?} is not a number"))?)
            }
            "--corpus" => o.corpus.push(val(a)?.into()),
            "--out" => o.out = Some(val(a)?.into()),
            "--base" => o.base = Some(val(a)?.into()),
            "--base-share" => o.base_share = Some(num(a, val(a)?)?),
            "--only-base" => o.only_base = true,
            "--work" => o.work = Some(val(a)?.into()),
            "--keep-if" => o.keep_if = Some(val(a)?),
            f if flags.contains(&f) => {
                o.flags.insert(f.to_string());
            }
            v if values.contains(&v) => {
                let x = val(a)?;
                o.values.insert(v.to_string(), x);
            }
            f if f.starts_with("--") => return Err(format!("unknown option {f}\n\n{USAGE}")),
            _ => o.free.push(a.clone()),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or(&[]);
    let r = match args.first().map(String::as_str) {
        Some("reader") => parse_opts(rest, &[], &[]).map(|o| fuzz_reader(&o)),
        Some("control") => parse_opts(rest, &[], &[]).map(|o| fuzz_control(&o)),
        Some("check") => parse_opts(rest, &["--reader", "--control"], &[]).map(|o| cmd_check(&o)),
        Some("record") => {
            parse_opts(rest, &["--count-only", "--incomplete", "--lossy", "--fork"], &["--mb", "--threads"])
                .map(|o| cmd_record(&o))
        }
        Some("pack") if rest.len() == 2 => Ok(cmd_pack(Path::new(&rest[0]), Path::new(&rest[1]))),
        Some("unpack") if rest.len() == 2 => Ok(cmd_unpack(Path::new(&rest[0]), Path::new(&rest[1]))),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => Err(USAGE.to_string()),
    };
    r.unwrap_or_else(fail)
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
}

fn cmd_pack(dir: &Path, file: &Path) -> ExitCode {
    match TraceInput::from_dir(dir, 1 << 30) {
        Ok(t) => match std::fs::write(file, t.to_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!("cannot write {}: {e}", file.display())),
        },
        Err(e) => fail(e),
    }
}

fn cmd_unpack(file: &Path, dir: &Path) -> ExitCode {
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) => return fail(format!("cannot read {}: {e}", file.display())),
    };
    match TraceInput::parse(&bytes) {
        Ok(t) => match t.write_to(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!("cannot create {}: {e}", dir.display())),
        },
        Err(e) => fail(format!("{}: {e}", file.display())),
    }
}

fn cmd_record(o: &Opts) -> ExitCode {
    let [dir] = &o.free[..] else { return fail(format!("record takes one directory\n\n{USAGE}")) };
    let get = |k: &str, d: f64| o.values.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(d);
    let g = gen::GenOptions {
        bytes: (get("--mb", 10.0) * 1e6) as u64,
        threads: get("--threads", 4.0) as usize,
        count_only: o.flags.contains("--count-only"),
        incomplete: o.flags.contains("--incomplete"),
        lossy: o.flags.contains("--lossy"),
        fork: o.flags.contains("--fork"),
        seed: o.seed.unwrap_or(1),
    };
    match gen::record_trace(Path::new(dir), &g) {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// The bounds for a reader input of `size` bytes, derived from a base
/// trace of `base` bytes if any: the 2 s and 200 MB for a base of
/// 10 MB or more, else those per byte of the base (or of the input).
fn reader_limits(size: usize, base: Option<usize>) -> Limits {
    let mut l = match base {
        Some(b) if b >= 10_000_000 => Limits { seconds: 2.0, bytes: 200 << 20, cap: None },
        Some(b) => Limits::scaled(b as u64, 256 << 10, 1.0),
        None => Limits::scaled(size as u64, 256 << 10, 1.0),
    };
    l.cap = Some(2 << 30);
    l
}

fn print_steps(o: &Outcome) {
    for s in &o.steps {
        let err = s.error.as_deref().map(|e| format!("  error: {}", shorten(e, 160))).unwrap_or_default();
        println!(
            "  {:<13} {:>8.3} s CPU {:>8.3} s wall {:>9.1} MB{err}",
            s.name,
            s.cpu,
            s.wall,
            s.peak as f64 / (1 << 20) as f64
        );
    }
    for f in &o.findings {
        println!("  FINDING {}", shorten(&f.to_string(), 400));
    }
}

fn shorten(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}... ({} bytes)", &s[..i], s.len()),
        None => s.to_string(),
    }
}

fn cmd_check(o: &Opts) -> ExitCode {
    check::install_panic_hook();
    let reader = o.flags.contains("--reader");
    if reader == o.flags.contains("--control") || o.free.is_empty() {
        return fail(format!("check takes --reader or --control and files\n\n{USAGE}"));
    }
    let work = o.work.clone().unwrap_or_else(default_work);
    let mut found = false;
    let names = check::function_names(NAMES);
    for f in &o.free {
        let bytes = match std::fs::read(f) {
            Ok(b) => b,
            Err(e) => return fail(format!("cannot read {f}: {e}")),
        };
        println!("{f}:");
        let outcome = if reader {
            let t = match TraceInput::parse(&bytes) {
                Ok(t) => t,
                Err(e) => return fail(format!("{f}: {e}")),
            };
            let dir = work.join("in");
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::create_dir_all(&work);
            if let Err(e) = t.write_to(&dir) {
                return fail(format!("cannot write {}: {e}", dir.display()));
            }
            let o = check::check_reader(&dir, &reader_limits(t.size(), None), true);
            let _ = std::fs::remove_dir_all(&dir);
            o
        } else {
            check::check_control(&bytes, &names, &CONTROL_LIMITS)
        };
        print_steps(&outcome);
        found |= !outcome.findings.is_empty();
    }
    let _ = std::fs::remove_dir(&work);
    if found {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn default_work() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    base.join(format!("textpoke-fuzz-{}", std::process::id()))
}

/// What a fuzzing run keeps track of.
struct Run {
    name: &'static str,
    out: PathBuf,
    seed: u64,
    start: Instant,
    inputs: u64,
    from_base: u64,
    /// Distinct findings (step, kind, shape) and how often each came.
    findings: HashMap<String, (u64, PathBuf)>,
    /// Behaviours seen: (step, error shape).
    seen: HashSet<(String, String)>,
    new_inputs: u64,
    /// Per step: the most CPU and memory, and the input's number, for
    /// inputs derived from the base trace and for the others.
    worst: HashMap<(bool, &'static str), (f64, u64, u64, u64)>,
    /// Per step: how many inputs it succeeded on.
    succeeded: HashMap<&'static str, u64>,
    /// How often each error shape of the `report` step came (what stops
    /// inputs before the analyses).
    refusals: HashMap<String, u64>,
}

impl Run {
    fn new(name: &'static str, o: &Opts) -> Run {
        let seed = o.seed.unwrap_or_else(clock_seed);
        let out = o.out.clone().unwrap_or_else(|| PathBuf::from("fuzz/out").join(name));
        Run {
            name,
            out,
            seed,
            start: Instant::now(),
            inputs: 0,
            from_base: 0,
            findings: HashMap::new(),
            seen: HashSet::new(),
            new_inputs: 0,
            worst: HashMap::new(),
            succeeded: HashMap::new(),
            refusals: HashMap::new(),
        }
    }

    /// Records an outcome; saves the input (`bytes()`) when it found
    /// something new or did something new. Returns whether it did
    /// something new.
    fn record(&mut self, o: &Outcome, from_base: bool, dir: &str, log: &str, bytes: &dyn Fn() -> Vec<u8>) -> bool {
        self.inputs += 1;
        self.from_base += from_base as u64;
        let n = self.inputs;
        for s in &o.steps {
            *self.succeeded.entry(s.name).or_default() += s.error.is_none() as u64;
            let w = self.worst.entry((from_base, s.name)).or_insert((0.0, 0, 0, 0));
            if s.cpu > w.0 {
                (w.0, w.1) = (s.cpu, n);
            }
            if s.peak > w.2 {
                (w.2, w.3) = (s.peak, n);
            }
        }
        for f in &o.findings {
            let shape = match &f.problem {
                check::Problem::Slow { .. } | check::Problem::Memory { .. } => String::new(),
                // A panic is known by where it happened.
                check::Problem::Panic(m) => m.rsplit_once(" at ").map_or(m.as_str(), |(_, at)| at).to_string(),
                check::Problem::Unnamed(m)
                | check::Problem::Inconsistent(m)
                | check::Problem::Nesting(m)
                | check::Problem::BadOutput(m)
                | check::Problem::Control(m) => message_shape(m, dir),
            };
            let key = format!("{} {} {shape}", f.step, f.problem.kind());
            match self.findings.get_mut(&key) {
                Some((count, _)) => *count += 1,
                None => {
                    let stem = format!("{}-{}-{}-{n}", f.problem.kind(), f.step, self.seed);
                    let path = self.save(&stem, bytes(), log, o, f);
                    eprintln!(
                        "[{}] input {n}: FOUND {} (saved as {})",
                        self.name,
                        shorten(&f.to_string(), 300),
                        path.display()
                    );
                    self.findings.insert(key, (1, path));
                }
            }
        }
        if let Some(e) = o.step("report").and_then(|s| s.error.as_deref()) {
            *self.refusals.entry(message_shape(e, dir)).or_default() += 1;
        }
        let mut new = false;
        for s in &o.steps {
            let shape = s.error.as_deref().map_or_else(|| "ok".to_string(), |e| message_shape(e, dir));
            new |= self.seen.insert((s.name.to_string(), shape));
        }
        if new && !from_base && self.inputs > 1 {
            self.new_inputs += 1;
            let dir = self.out.join("new");
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(dir.join(format!("{}-{n}", self.seed)), bytes());
        }
        new
    }

    /// Saves an input asked for with `--keep-if`, with its mutations and
    /// what each step did.
    fn keep(&self, bytes: &[u8], log: &str, o: &Outcome) {
        let dir = self.out.join("kept");
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("{}-{}.tpf", self.seed, self.inputs));
        let _ = std::fs::write(&path, bytes);
        let _ = std::fs::write(path.with_extension("txt"), format!("mutations: {log}\n\nsteps:\n{}", steps_text(o)));
    }

    fn save(&self, stem: &str, bytes: Vec<u8>, log: &str, o: &Outcome, f: &Finding) -> PathBuf {
        let _ = std::fs::create_dir_all(&self.out);
        let ext = if self.name == "reader" { "tpf" } else { "line" };
        let path = self.out.join(format!("{stem}.{ext}"));
        let _ = std::fs::write(&path, bytes);
        let text = format!("finding: {f}\nmutations: {log}\n\nsteps:\n{}", steps_text(o));
        let _ = std::fs::write(path.with_extension("txt"), text);
        path
    }

    fn summary(&self) -> ExitCode {
        let secs = self.start.elapsed().as_secs_f64();
        println!(
            "{}: {} inputs in {secs:.1} s ({:.1} inputs/s), {} derived from the base trace; seed {}",
            self.name,
            self.inputs,
            self.inputs as f64 / secs,
            self.from_base,
            self.seed
        );
        for base in [true, false] {
            let mut rows: Vec<_> = self.worst.iter().filter(|((b, _), _)| *b == base).collect();
            if rows.is_empty() {
                continue;
            }
            rows.sort_by_key(|((_, s), _)| *s);
            println!(
                "  {}: slowest and largest per step (CPU s, input; heap MB, input)",
                if base { "inputs derived from the base trace" } else { "other inputs" }
            );
            for ((_, step), (cpu, ci, peak, pi)) in rows {
                println!("    {step:<13} {cpu:>8.3} s  #{ci:<7} {:>9.1} MB  #{pi}", *peak as f64 / (1 << 20) as f64);
            }
        }
        let mut ok: Vec<_> = self.succeeded.iter().collect();
        ok.sort();
        let ok: Vec<String> =
            ok.iter().map(|(s, n)| format!("{s} {:.0}%", **n as f64 * 100.0 / self.inputs.max(1) as f64)).collect();
        println!("  inputs each step succeeded on: {}", ok.join(", "));
        let mut refusals: Vec<_> = self.refusals.iter().collect();
        refusals.sort_by(|a, b| b.1.cmp(a.1));
        for (shape, n) in refusals.iter().take(8) {
            println!("    refused {n:>6} x {}", shorten(shape, 150));
        }
        println!(
            "  inputs that did something new: {} (saved under {})",
            self.new_inputs,
            self.out.join("new").display()
        );
        if self.findings.is_empty() {
            println!("  findings: none");
            return ExitCode::SUCCESS;
        }
        println!("  findings: {} distinct", self.findings.len());
        let mut f: Vec<_> = self.findings.iter().collect();
        f.sort();
        for (key, (count, path)) in f {
            println!("    {count:>6} x {}  -> {}", shorten(key, 200), path.display());
        }
        ExitCode::FAILURE
    }
}

/// Each step's figures and outcome, a line each.
fn steps_text(o: &Outcome) -> String {
    o.steps
        .iter()
        .map(|s| {
            format!("  {} {:.3} s CPU, {} KB, {}\n", s.name, s.cpu, s.peak >> 10, s.error.as_deref().unwrap_or("ok"))
        })
        .collect()
}

/// When an input started (ms since the Unix epoch; 0: none running).
static STARTED: AtomicU64 = AtomicU64::new(0);
/// An input running longer than this (wall clock) is a hang.
const HANG_SECS: u64 = 120;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Saves the input being checked and stops the process if it hangs.
fn watchdog(input_dir: PathBuf, out: PathBuf, seed: u64) {
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        let s = STARTED.load(Ordering::Relaxed);
        if s != 0 && now_ms().saturating_sub(s) > HANG_SECS * 1000 {
            let _ = std::fs::create_dir_all(&out);
            let path = out.join(format!("hang-{seed}-{s}.tpf"));
            let saved = TraceInput::from_dir(&input_dir, 1 << 30).map(|t| std::fs::write(&path, t.to_bytes()));
            eprintln!("textpoke-fuzz: an input ran over {HANG_SECS} s; saved as {} ({saved:?})", path.display());
            std::process::exit(3);
        }
    });
}

fn load_corpus(dirs: &[PathBuf], pick: &dyn Fn(&Path) -> bool) -> Result<Vec<(PathBuf, Vec<u8>)>, String> {
    let mut out = Vec::new();
    for d in dirs {
        let rd = std::fs::read_dir(d).map_err(|e| format!("cannot read corpus {}: {e}", d.display()))?;
        let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).filter(|p| p.is_file() && pick(p)).collect();
        files.sort();
        for f in files {
            let b = std::fs::read(&f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
            out.push((f, b));
        }
    }
    Ok(out)
}

/// Inputs of the pool at most this big; bigger ones are not kept.
const POOL_INPUT_MAX: usize = 2 << 20;
const POOL_MAX: usize = 3000;

fn fuzz_reader(o: &Opts) -> ExitCode {
    check::install_panic_hook();
    let mut run = Run::new("reader", o);
    let mut rng = Rng::new(run.seed);
    let corpus = match load_corpus(&o.corpus, &|p| p.extension().is_some_and(|e| e == "tpf")) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let mut pool: Vec<Arc<TraceInput>> = Vec::new();
    for (p, b) in &corpus {
        match TraceInput::parse(b) {
            Ok(t) => pool.push(Arc::new(t)),
            Err(e) => return fail(format!("{}: {e}", p.display())),
        }
    }
    let base = match &o.base {
        Some(d) => match TraceInput::from_dir(d, 1 << 30) {
            Ok(t) => Some(Arc::new(t)),
            Err(e) => return fail(e),
        },
        None => None,
    };
    if pool.is_empty() && base.is_none() {
        return fail("no input: give --corpus DIR or --base DIR");
    }
    let share = if o.only_base || pool.is_empty() { 1.0 } else { o.base_share.unwrap_or(0.25) };
    let work = o.work.clone().unwrap_or_else(default_work);
    if let Err(e) = std::fs::create_dir_all(&work) {
        return fail(format!("cannot create {}: {e}", work.display()));
    }
    let dir = work.join("in");
    let dir_s = dir.display().to_string();
    watchdog(dir.clone(), run.out.clone(), run.seed);
    println!(
        "reader: seed {}, {} corpus input(s), base {}, work {}, {} s",
        run.seed,
        pool.len(),
        base.as_ref().map_or("none".to_string(), |b| format!("{} bytes", b.size())),
        work.display(),
        o.seconds
    );
    let deadline = Instant::now() + Duration::from_secs_f64(o.seconds);
    let mut last_report = Instant::now();
    while Instant::now() < deadline && o.inputs.is_none_or(|n| run.inputs < n) {
        let from_base = base.is_some() && (rng.below(1000) as f64) < share * 1000.0;
        let parent = if from_base { base.clone().expect("a base") } else { rng.pick(&pool).clone() };
        let room = if from_base { parent.size() + parent.size() / 4 } else { (parent.size() * 4).max(POOL_INPUT_MAX) };
        let others: Vec<&TraceInput> = (0..3).filter_map(|_| pool.get(rng.below(pool.len())).map(|a| &**a)).collect();
        let (input, log) = mutate::mutate_trace(&mut rng, &parent, &others, room);
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = input.write_to(&dir) {
            return fail(format!("cannot write {}: {e}", dir.display()));
        }
        STARTED.store(now_ms(), Ordering::Relaxed);
        let validate = input.size() < POOL_INPUT_MAX;
        let base_size = if from_base { Some(parent.size()) } else { None };
        let outcome = check::check_reader(&dir, &reader_limits(input.size(), base_size), validate);
        STARTED.store(0, Ordering::Relaxed);
        let log = log.join("; ");
        let new = run.record(&outcome, from_base, &dir_s, &log, &|| input.to_bytes());
        if o.keep_if.as_ref().is_some_and(|k| k.split('|').any(|t| log.contains(t))) {
            run.keep(&input.to_bytes(), &log, &outcome);
        }
        if new && input.size() <= POOL_INPUT_MAX {
            if pool.len() < POOL_MAX {
                pool.push(Arc::new(input));
            } else {
                let i = rng.below(pool.len());
                pool[i] = Arc::new(input);
            }
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            let secs = run.start.elapsed().as_secs_f64();
            eprintln!(
                "[reader] {:.0} s: {} inputs ({:.1}/s), pool {}, findings {}",
                secs,
                run.inputs,
                run.inputs as f64 / secs,
                pool.len(),
                run.findings.len()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir(&work);
    run.summary()
}

/// Function names the control checks match globs against.
const NAMES: usize = 5000;
/// A request, glob and hints included, must be answered within this
/// (the agent serves every connection from one thread).
const CONTROL_LIMITS: Limits = Limits { seconds: 0.25, bytes: 64 << 20, cap: Some(1 << 30) };

fn fuzz_control(o: &Opts) -> ExitCode {
    check::install_panic_hook();
    let mut run = Run::new("control", o);
    let mut rng = Rng::new(run.seed);
    let mut pool: Vec<Vec<u8>> = match load_corpus(&o.corpus, &|_| true) {
        Ok(c) => c.into_iter().map(|(_, b)| b).collect(),
        Err(e) => return fail(e),
    };
    for seed in ["status\n", "enable work*\n", "disable *\r\n", "enable {a,b}_[0-9]?\n", "enable ns::*<*>\n"] {
        pool.push(seed.as_bytes().to_vec());
    }
    let names = check::function_names(NAMES);
    println!("control: seed {}, {} starting line(s), {} s", run.seed, pool.len(), o.seconds);
    let deadline = Instant::now() + Duration::from_secs_f64(o.seconds);
    while Instant::now() < deadline && o.inputs.is_none_or(|n| run.inputs < n) {
        let parent = rng.pick(&pool).clone();
        let others: Vec<&[u8]> = (0..2).map(|_| pool[rng.below(pool.len())].as_slice()).collect();
        let (line, log) = mutate::mutate_line(&mut rng, &parent, &others);
        let outcome = check::check_control(&line, &names, &CONTROL_LIMITS);
        let new = run.record(&outcome, false, "", &log, &|| line.clone());
        if new && line.len() <= 1 << 16 && pool.len() < POOL_MAX {
            pool.push(line);
        }
    }
    run.summary()
}
