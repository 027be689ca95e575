//! `textpoke record -p PID` end to end (issue #11): a multithreaded C
//! program, started without textpoke, is attached to, recorded for half a
//! second and detached from, over and over; it checks every system call
//! it makes (no `EINTR`, no short sleep) and counts its own calls; after
//! each detach the test checks that its sites hold their original bytes,
//! and that its threads, descriptors, signal dispositions and masks are
//! its own again. Refusals leave their target running as it was.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};
use textpoke_record::tracedata::Trace;

fn work_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("attach-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fresh(name: &str) -> PathBuf {
    let p = work_dir().join(name);
    let _ = std::fs::remove_dir_all(&p);
    p
}

/// A private socket directory.
fn socket_dir(name: &str) -> PathBuf {
    let d = fresh(&format!("sock-{name}"));
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    d
}

fn textpoke(sockets: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_textpoke"));
    c.env("TEXTPOKE_SOCKET_DIR", sockets).current_dir(work_dir()).stdin(Stdio::null());
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The entry flags of gcc's mcount form: a 5-byte NOP per function, in
/// `__mcount_loc`; enabling one takes the breakpoint protocol, no signal.
/// `-pg` is for compiling only: linked with it, glibc starts profiling
/// (`SIGPROF` every few milliseconds).
const MCOUNT: &[&str] = &["-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount", "-fno-pie"];
/// gcc's pads: five one-byte NOPs per function, enabled by their first
/// byte (a jump to a mirror slot 1.74 GiB below, which a position-
/// independent program has room for), signalling no thread.
const PADS: &[&str] = &["-fpatchable-function-entry=5", "-fPIE"];
/// The same in a program linked at 0x400000: the mirrors would be below
/// address 0, so its pads are left out (tracing them would signal).
const PADS_NO_PIE: &[&str] = &["-fpatchable-function-entry=5", "-fno-pie"];

/// Compiles `src` with `flags`, links it (`-no-pie` with `-fno-pie`).
fn compile(name: &str, src: &str, flags: &[&str]) -> PathBuf {
    let dir = work_dir();
    let (c, o, exe) = (dir.join(format!("{name}.c")), dir.join(format!("{name}.o")), dir.join(name));
    std::fs::write(&c, src).unwrap();
    let cc = |args: &mut Command| {
        let out = args.output().expect("gcc must be installed to build the test programs");
        assert!(out.status.success(), "gcc {name}: {}", text(&out.stderr));
    };
    cc(Command::new("gcc").args(["-O1", "-pthread", "-c", "-o"]).arg(&o).arg(&c).args(flags));
    let no_pie: &[&str] = if flags.contains(&"-fno-pie") { &["-no-pie"] } else { &[] };
    cc(Command::new("gcc").args(["-pthread", "-o"]).arg(&exe).arg(&o).args(no_pie));
    exe
}

// ---------------------------------------------------------------------------
// The target.

/// 11 threads: 3 workers calling `t_work` (which calls `t_leaf` 5 times)
/// in a loop between stretches of untraced work, counting both exactly; 2 in `nanosleep` (15 ms), 1 in
/// `clock_nanosleep` (15 ms), each checking the time slept and calling
/// `t_tick` once per round; 1 blocked in `read` on a pipe the main thread
/// feeds every 10 ms; 1 in `FUTEX_WAIT` woken by the main thread, 1 in a
/// timed `FUTEX_WAIT` (20 ms, `ETIMEDOUT` after the full time); 1 reading
/// commands on stdin; the main thread. Any failed call, `EINTR` or short
/// wait is counted and printed.
///
/// stdin commands: `c` prints `counts WORK LEAF TICK`; `f` forks a child
/// that calls `t_work` every 200 µs until killed, prints `child PID`; `q` stops the
/// threads, checks, prints `done errors=N ...` and exits 0 iff N is 0.
const TARGET_C: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static atomic_int stop;
static atomic_long errors, n_work, n_leaf, n_tick, n_reads, n_sleeps, n_futex, n_futex_t;
static atomic_int ready;
static atomic_uint futex_word;
static unsigned futex_never;
static int feed[2];
static volatile long sink;

static void fail(const char *what, long v, int err) {
    fprintf(stderr, "FAIL %s: %ld (errno %d: %s)\n", what, v, err, strerror(err));
    atomic_fetch_add(&errors, 1);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

__attribute__((noipa)) long t_leaf(long x) { atomic_fetch_add_explicit(&n_leaf, 1, memory_order_relaxed); return x * 3 + 1; }
__attribute__((noipa)) long t_work(long n) {
    atomic_fetch_add_explicit(&n_work, 1, memory_order_relaxed);
    long s = 0;
    for (long i = 0; i < n; i++) s += t_leaf(i);
    return s;
}
__attribute__((noipa)) void t_tick(void) { atomic_fetch_add_explicit(&n_tick, 1, memory_order_relaxed); }

static void *worker(void *a) {
    (void)a;
    atomic_fetch_add(&ready, 1);
    while (!atomic_load(&stop)) {
        sink += t_work(5);
        for (int i = 0; i < 2000; i++) sink++; /* untraced work between calls */
    }
    return NULL;
}

static void *sleeper(void *a) {
    long clock = (long)a;
    atomic_fetch_add(&ready, 1);
    while (!atomic_load(&stop)) {
        t_tick();
        struct timespec ts = {0, 15000000};
        double t0 = now();
        int rc = clock ? clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL) : nanosleep(&ts, NULL);
        int err = clock ? rc : errno;
        double el = now() - t0;
        if (rc != 0) fail(clock ? "clock_nanosleep" : "nanosleep", rc, err);
        else if (el < 0.015) fail("sleep short (us)", (long)(el * 1e6), 0);
        atomic_fetch_add(&n_sleeps, 1);
    }
    return NULL;
}

static void *reader(void *a) {
    (void)a;
    atomic_fetch_add(&ready, 1);
    for (;;) {
        char c;
        ssize_t n = read(feed[0], &c, 1);
        if (n != 1) { fail("read", n, errno); if (n == 0) break; continue; }
        if (c == 'q') break;
        t_tick();
        atomic_fetch_add(&n_reads, 1);
    }
    return NULL;
}

static long futex(unsigned *w, int op, unsigned v, const struct timespec *ts) {
    return syscall(SYS_futex, w, op, v, ts, NULL, 0);
}

static void *futex_waiter(void *a) {
    (void)a;
    atomic_fetch_add(&ready, 1);
    for (;;) {
        unsigned v = atomic_load(&futex_word);
        if (v == 0xffffffffu) break;
        long rc = futex((unsigned *)&futex_word, FUTEX_WAIT_PRIVATE, v, NULL);
        if (rc != 0 && errno != EAGAIN) fail("futex wait", rc, errno);
        atomic_fetch_add(&n_futex, 1);
    }
    return NULL;
}

static void *futex_timed(void *a) {
    (void)a;
    atomic_fetch_add(&ready, 1);
    while (!atomic_load(&stop)) {
        struct timespec ts = {0, 20000000};
        double t0 = now();
        long rc = futex(&futex_never, FUTEX_WAIT_PRIVATE, 0, &ts);
        int err = errno;
        double el = now() - t0;
        if (rc != -1 || err != ETIMEDOUT) fail("futex timed wait", rc, err);
        else if (el < 0.020) fail("futex timed wait short (us)", (long)(el * 1e6), 0);
        atomic_fetch_add(&n_futex_t, 1);
    }
    return NULL;
}

static void *commands(void *a) {
    (void)a;
    atomic_fetch_add(&ready, 1);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (line[0] == 'q') break;
        if (line[0] == 'f') {
            pid_t child = fork();
            if (child == 0) { /* one thread: calls traced code until killed */
                for (;;) { sink += t_work(5); usleep(200); }
            }
            printf("child %d\n", (int)child);
            fflush(stdout);
        }
        if (line[0] == 'c') {
            printf("counts %ld %ld %ld\n", atomic_load(&n_work), atomic_load(&n_leaf), atomic_load(&n_tick));
            fflush(stdout);
        }
    }
    atomic_store(&stop, 1);
    return NULL;
}

int main(void) {
    if (pipe(feed)) return 2;
    pthread_t t[10];
    int k = 0;
    for (int i = 0; i < 3; i++) pthread_create(&t[k++], NULL, worker, NULL);
    pthread_create(&t[k++], NULL, sleeper, (void *)0);
    pthread_create(&t[k++], NULL, sleeper, (void *)0);
    pthread_create(&t[k++], NULL, sleeper, (void *)1);
    pthread_create(&t[k++], NULL, reader, NULL);
    pthread_create(&t[k++], NULL, futex_waiter, NULL);
    pthread_create(&t[k++], NULL, futex_timed, NULL);
    pthread_create(&t[k++], NULL, commands, NULL);
    while (atomic_load(&ready) < k) usleep(1000);
    printf("ready %d\n", getpid());
    fflush(stdout);
    while (!atomic_load(&stop)) {
        struct timespec ts = {0, 10000000};
        int rc = clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL);
        if (rc != 0) fail("main clock_nanosleep", rc, rc);
        if (write(feed[1], "x", 1) != 1) fail("write", -1, errno);
        atomic_fetch_add(&futex_word, 1);
        futex((unsigned *)&futex_word, FUTEX_WAKE_PRIVATE, 1, NULL);
    }
    if (write(feed[1], "q", 1) != 1) fail("write q", -1, errno);
    atomic_store(&futex_word, 0xffffffffu);
    futex((unsigned *)&futex_word, FUTEX_WAKE_PRIVATE, 1, NULL);
    for (int i = 0; i < k; i++) pthread_join(t[i], NULL);
    printf("done errors=%ld work=%ld leaf=%ld tick=%ld reads=%ld sleeps=%ld futex=%ld futex_t=%ld\n",
           atomic_load(&errors), atomic_load(&n_work), atomic_load(&n_leaf), atomic_load(&n_tick),
           atomic_load(&n_reads), atomic_load(&n_sleeps), atomic_load(&n_futex), atomic_load(&n_futex_t));
    return atomic_load(&errors) != 0;
}
"#;

/// The target, running.
struct Target {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
    pid: i32,
    exe: PathBuf,
}

impl Target {
    fn start(exe: PathBuf, sockets: &Path) -> Target {
        let mut child = Command::new(&exe)
            .env("TEXTPOKE_SOCKET_DIR", sockets)
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let pid: i32 = line.trim().strip_prefix("ready ").and_then(|p| p.parse().ok()).expect(&line);
        let stdin = child.stdin.take().unwrap();
        Target { child, stdin, out, pid, exe }
    }

    /// The target's own call counts: (t_work, t_leaf, t_tick).
    fn counts(&mut self) -> (u64, u64, u64) {
        writeln!(self.stdin, "c").unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        let n: Vec<u64> = line.split_whitespace().skip(1).map(|v| v.parse().unwrap()).collect();
        assert_eq!(n.len(), 3, "{line}");
        (n[0], n[1], n[2])
    }

    /// Forks a child (see the program): its pid.
    fn fork(&mut self) -> i32 {
        writeln!(self.stdin, "f").unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        line.trim().strip_prefix("child ").and_then(|p| p.parse().ok()).expect(&line)
    }

    /// Stops it: its summary line, after checking it found no error.
    fn finish(mut self) -> String {
        writeln!(self.stdin, "q").unwrap();
        drop(self.stdin);
        let mut rest = String::new();
        self.out.read_to_string(&mut rest).unwrap();
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        self.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(rest.contains("done errors=0 "), "the target saw a failed, interrupted or short call:\n{rest}\n{err}");
        assert!(status.success(), "{status:?}: {err}");
        rest.trim().to_string()
    }

    /// The state detach must leave as it found.
    fn snapshot(&self) -> Snapshot {
        let pid = self.pid;
        let tasks: BTreeMap<i32, String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .map(|t| (t, std::fs::read_to_string(format!("/proc/{pid}/task/{t}/comm")).unwrap_or_default()))
            .map(|(t, c)| (t, c.trim_end().to_string()))
            .collect();
        let masks =
            tasks.keys().map(|t| (*t, status_field(&format!("/proc/{pid}/task/{t}/status"), "SigBlk"))).collect();
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .map(|e| {
                let link = std::fs::read_link(e.path()).map(|l| l.display().to_string()).unwrap_or_default();
                (e.file_name().to_string_lossy().into_owned(), link)
            })
            .collect();
        Snapshot {
            tasks,
            masks,
            fds,
            caught: status_field(&format!("/proc/{pid}/status"), "SigCgt"),
            ignored: status_field(&format!("/proc/{pid}/status"), "SigIgn"),
        }
    }
}

fn status_field(path: &str, key: &str) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')).unwrap_or("").trim().to_string()
}

#[derive(Debug, PartialEq, Eq, Clone)]
struct Snapshot {
    /// Thread id → name.
    tasks: BTreeMap<i32, String>,
    /// Thread id → blocked signals.
    masks: BTreeMap<i32, String>,
    /// Descriptor → what it is.
    fds: BTreeMap<String, String>,
    /// Signals with a handler, ignored: the dispositions.
    caught: String,
    ignored: String,
}

/// The tracer's reclaimer thread: a detach stops it, but a forked child's
/// own end of tracing starts one in the child.
const RECLAIMER: &str = "textpoke-reclai";

impl Snapshot {
    /// `self` (after a detach) is `base` again, but for the leftovers;
    /// `None` when it is, else what differs.
    fn differs_from(&self, base: &Snapshot) -> Option<String> {
        let extra: Vec<(&i32, &String)> = self.tasks.iter().filter(|(t, _)| !base.tasks.contains_key(t)).collect();
        let missing: Vec<&i32> = base.tasks.keys().filter(|t| !self.tasks.contains_key(t)).collect();
        let mut why = Vec::new();
        if !missing.is_empty() || !extra.is_empty() {
            why.push(format!("threads: {:?}, base {:?}", self.tasks, base.tasks));
        }
        for (t, m) in &base.masks {
            if self.masks.get(t) != Some(m) {
                why.push(format!("thread {t}'s mask {:?}, base {m}", self.masks.get(t)));
            }
        }
        if self.fds != base.fds {
            why.push(format!("fds {:?}, base {:?}", self.fds, base.fds));
        }
        if (&self.caught, &self.ignored) != (&base.caught, &base.ignored) {
            why.push(format!(
                "dispositions: caught {} ignored {}, base {} {}",
                self.caught, self.ignored, base.caught, base.ignored
            ));
        }
        (!why.is_empty()).then(|| why.join("\n"))
    }
}

/// The site addresses of `exe` in process `pid` (`textpoke list`'s, plus
/// where a position-independent `exe` is loaded).
fn sites_in(pid: i32, exe: &Path) -> Vec<(u64, String)> {
    let base = load_base(pid, exe);
    sites_of(exe).into_iter().map(|(a, f)| (a + base, f)).collect()
}

/// Where `exe` is loaded in `pid`: 0 for a program linked at a fixed
/// address (`ET_EXEC`), else the start of its mapping at file offset 0.
fn load_base(pid: i32, exe: &Path) -> u64 {
    let header = std::fs::read(exe).unwrap();
    if u16::from_le_bytes([header[16], header[17]]) == 2 {
        return 0; // ET_EXEC
    }
    let exe = exe.canonicalize().unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let is_exe = f.len() >= 6 && Path::new(f[5]) == exe && u64::from_str_radix(f[2], 16) == Ok(0);
            is_exe.then(|| u64::from_str_radix(f[0].split('-').next().unwrap(), 16).unwrap())
        })
        .expect("the program is mapped")
}

/// The site addresses of `exe` as linked, from `textpoke list`.
fn sites_of(exe: &Path) -> Vec<(u64, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_textpoke")).arg("list").arg(exe).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (u64::from_str_radix(f[0].trim_start_matches("0x"), 16).unwrap(), f[f.len() - 1].to_string())
        })
        .collect()
}

/// The bytes at each site in the running process.
fn site_bytes(pid: i32, sites: &[(u64, String)]) -> Vec<[u8; 5]> {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    sites
        .iter()
        .map(|(a, _)| {
            let mut b = [0u8; 5];
            mem.read_exact_at(&mut b, *a).unwrap();
            b
        })
        .collect()
}

/// `textpoke record -p`'s timings from its `--verbose` lines (ms):
/// (sites live, detach answered).
fn timings(stderr: &str) -> (f64, f64) {
    let after = |l: &str, key: &str| -> Option<f64> {
        let rest = &l[l.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    let live = stderr.lines().find_map(|l| after(l, "sites live at ")).expect(stderr);
    let detach = stderr.lines().find_map(|l| after(l, "answered in ")).expect(stderr);
    (live, detach)
}

/// Waits until `f` holds (the agent's threads end and its socket closes
/// a moment after it answered), at most 5 s; the last value.
fn settle<T>(mut f: impl FnMut() -> (bool, T)) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (ok, v) = f();
        if ok || Instant::now() >= deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Attaches `rounds` times to a target built with `flags`, half a second
/// each, checking everything after each detach (module docs).
fn attach_detach_rounds(name: &str, flags: &[&str], rounds: usize) {
    let exe = compile(name, TARGET_C, flags);
    let sockets = socket_dir(name);
    let mut target = Target::start(exe, &sockets);
    let pid = target.pid;
    let sites = sites_in(pid, &target.exe);
    assert!(sites.len() >= 10, "{sites:?}");
    // Never patched yet: the bytes the compiler wrote, a NOP form.
    let original = site_bytes(pid, &sites);
    for b in &original {
        assert!(*b == [0x0f, 0x1f, 0x44, 0x00, 0x00] || *b == [0x90; 5], "{b:02x?} is no entry NOP");
    }
    let base = target.snapshot();
    let (mut lives, mut detaches, mut firsts) = (Vec::new(), Vec::new(), Vec::new());
    let mut kept_sigtrap = 0;
    for round in 0..rounds {
        let dir = fresh(&format!("{name}-{round}.data"));
        let before = target.counts();
        let t0 = monotonic_ns();
        let out = textpoke(&sockets)
            .args(["record", "-v", "--duration", "0.5", "-p", &pid.to_string(), "-o"])
            .arg(&dir)
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "round {round}: {stderr}");
        let after = target.counts();
        let (live, detach) = timings(&stderr);
        lives.push(live);
        detaches.push(detach);
        if stderr.contains("SIGTRAP: kept") {
            kept_sigtrap += 1;
        }

        // The trace: complete, counts plausible, a report works.
        let trace = Trace::open(&dir).unwrap_or_else(|e| panic!("round {round}: {e}\n{stderr}"));
        assert!(trace.is_complete(), "round {round}");
        let counts: BTreeMap<String, u64> =
            trace.counts().iter().map(|&(f, n)| (trace.name(f).to_string(), n)).collect();
        // Calls in flight at the attach or the detach: one per thread.
        for (f, own, threads) in [("t_work", after.0 - before.0, 3), ("t_leaf", after.1 - before.1, 3)] {
            let got = counts.get(f).copied().unwrap_or(0);
            assert!(
                got > 0 && got <= own + threads,
                "round {round}: {f} recorded {got} times, the target counted {own}"
            );
        }
        assert!(counts.get("t_tick").copied().unwrap_or(0) <= after.2 - before.2 + 5, "round {round}: {counts:?}");
        let first = trace
            .threads()
            .iter()
            .filter_map(|th| trace.records(th).ok()?.next()?.ok())
            .map(|r| trace.to_ns(r.ts))
            .min()
            .expect("events recorded");
        firsts.push(first.saturating_sub(t0) as f64 / 1e6);
        let report = textpoke(&sockets).args(["report", "-i"]).arg(&dir).output().unwrap();
        assert!(report.status.success(), "round {round}: report: {}", text(&report.stderr));
        assert!(text(&report.stdout).contains("t_leaf"), "{}", text(&report.stdout));

        // The target as it was: every site, gcc's pads too, holds its
        // original bytes again.
        let now = site_bytes(pid, &sites);
        assert_eq!(now, original, "round {round}: site bytes after the detach");
        assert!(stderr.contains("every site has its original bytes again"), "round {round}: {stderr}");
        assert!(!stderr.contains("left out"), "round {round}: {stderr}");
        let now = settle(|| {
            let s = target.snapshot();
            (s.differs_from(&base).is_none(), s)
        });
        if let Some(why) = now.differs_from(&base) {
            panic!("round {round}: the target is not as it was after the detach:\n{why}\n{stderr}");
        }
        assert!(!stderr.contains("warning"), "round {round}: {stderr}");
    }
    let summary = target.finish();
    let (live, detach, first) = (median(&mut lives), median(&mut detaches), median(&mut firsts));
    println!(
        "{name}: {rounds} attach/detach rounds; median (ms): sites live {live:.1} and first event {first:.1} after \
         `record -p` started, detach {detach:.1}; max: live {:.1}, first {:.1}, detach {:.1}; SIGTRAP kept \
         {kept_sigtrap} times; target: {summary}",
        lives.last().unwrap(),
        firsts.last().unwrap(),
        detaches.last().unwrap(),
    );
}

#[test]
fn attach_record_detach_twenty_times_leaves_the_target_as_it_was() {
    attach_detach_rounds("mcount", MCOUNT, 20);
}

/// gcc's pads (five one-byte NOPs) are enabled by their first byte: no
/// thread is signalled (the target's sleeps and waits see no `EINTR`), and
/// each pad has its five NOPs back after the detach.
#[test]
fn attach_record_detach_with_pads() {
    attach_detach_rounds("pads", PADS, 10);
}

/// A program linked at 0x400000 (not position-independent): its pads'
/// mirrors would lie below address 0. Attaching works, the pads are left
/// out with the reason and what to do, no thread gets a signal, and no
/// site changes.
#[test]
fn pads_of_a_program_at_a_fixed_address_are_left_out() {
    let exe = compile("pads-fixed", TARGET_C, PADS_NO_PIE);
    let sockets = socket_dir("pads-fixed");
    let mut target = Target::start(exe, &sockets);
    let pid = target.pid;
    let sites = sites_in(pid, &target.exe);
    let original = site_bytes(pid, &sites);
    assert!(original.iter().all(|b| *b == [0x90; 5]), "{original:02x?}");
    let base = target.snapshot();
    let dir = fresh("pads-fixed.data");
    let out = textpoke(&sockets)
        .args(["record", "--no-libcall", "--duration", "0.5", "-p", &pid.to_string(), "-o"])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("recording 0 of"), "{stderr}");
    assert!(stderr.contains("function(s) left out"), "{stderr}");
    assert!(stderr.contains("rebuild it with -fPIE -pie"), "{stderr}");
    assert_eq!(site_bytes(pid, &sites), original);
    let now = settle(|| {
        let s = target.snapshot();
        (s.differs_from(&base).is_none(), s)
    });
    if let Some(why) = now.differs_from(&base) {
        panic!("the target is not as it was after the detach:\n{why}\n{stderr}");
    }
    let _ = target.counts();
    println!("{}", target.finish());
}

// ---------------------------------------------------------------------------
// Refusals.

fn record_p(sockets: &Path, pid: i32, extra: &[&str]) -> Output {
    textpoke(sockets)
        .args(["record", "-p", &pid.to_string(), "-o"])
        .arg(fresh(&format!("refused-{pid}.data")))
        .args(extra)
        .output()
        .unwrap()
}

fn refused(out: &Output, want: &str) -> String {
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(want), "expected {want:?} in: {stderr}");
    stderr
}

/// Running, not stopped, not traced.
fn runs_untouched(pid: i32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let state = status.lines().find_map(|l| l.strip_prefix("State:")).unwrap().trim().to_string();
    assert!(state.starts_with('S') || state.starts_with('R'), "{state}");
    assert_eq!(status_field(&format!("/proc/{pid}/status"), "TracerPid"), "0");
}

#[test]
fn a_process_that_does_not_exist_is_refused() {
    let mut c = Command::new("true").spawn().unwrap();
    c.wait().unwrap();
    let out = record_p(&socket_dir("gone"), c.id() as i32, &[]);
    refused(&out, "does not exist");
}

#[test]
fn a_process_without_sites_is_refused_and_left_alone() {
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = sleeper.id() as i32;
    std::thread::sleep(Duration::from_millis(50));
    let out = record_p(&socket_dir("nosites"), pid, &[]);
    refused(&out, "has no patchable function entries");
    runs_untouched(pid);
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(!maps.contains("libtextpoke_agent"), "nothing was loaded");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

/// A second `record -p` while one is attached is refused, with the first
/// one untouched; a glob that matches nothing is refused before anything
/// happens.
#[test]
fn a_second_concurrent_attach_is_refused() {
    let exe = compile("concurrent", TARGET_C, MCOUNT);
    let sockets = socket_dir("concurrent");
    let mut target = Target::start(exe, &sockets);
    let pid = target.pid;
    let out = record_p(&sockets, pid, &["-F", "t_laef"]);
    refused(&out, "did you mean: t_leaf");
    let dir = fresh("concurrent-first.data");
    let mut first = textpoke(&sockets)
        .args(["record", "--duration", "30", "-p", &pid.to_string(), "-o"])
        .arg(&dir)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(first.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("attached to process"), "{line}");
    let out = record_p(&sockets, pid, &[]);
    refused(&out, "is being recorded by textpoke");
    // `ctl` reaches the attached agent.
    let ctl = textpoke(&sockets).args(["ctl", &pid.to_string(), "status"]).output().unwrap();
    assert!(ctl.status.success() && text(&ctl.stdout).contains("recording"), "{}", text(&ctl.stderr));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(first.id() as i32, libc::SIGINT) };
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert!(first.wait().unwrap().success(), "{rest}");
    assert!(rest.contains("detached from process"), "{rest}");
    let trace = Trace::open(&dir).unwrap();
    assert!(trace.is_complete());
    let _ = target.counts();
    println!("{}", target.finish());
}

/// A program started under `textpoke record` has its agent preloaded:
/// `record -p` sends the user to `ctl`.
#[test]
fn a_process_under_textpoke_record_is_refused() {
    let exe = compile("preloaded", TARGET_C, MCOUNT);
    let sockets = socket_dir("preloaded");
    let dir = fresh("preloaded.data");
    let mut rec = textpoke(&sockets)
        .arg("record")
        .arg("-o")
        .arg(&dir)
        .arg(&exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(rec.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let pid: i32 = line.trim().strip_prefix("ready ").and_then(|p| p.parse().ok()).expect(&line);
    let got = record_p(&sockets, pid, &[]);
    refused(&got, "runs under `textpoke record`");
    writeln!(rec.stdin.take().unwrap(), "q").unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("done errors=0 "), "{rest}");
    assert!(rec.wait().unwrap().success());
}

/// A child forked while attached records into `DIR/child-<pid>/`; when the
/// parent detaches, the child (still running) ends tracing too: its trace
/// is complete, its sites have their bytes back, its agent thread and
/// descriptors are gone.
#[test]
fn a_child_forked_while_attached_detaches_with_its_parent() {
    let exe = compile("forking", TARGET_C, MCOUNT);
    let sockets = socket_dir("forking");
    let mut target = Target::start(exe, &sockets);
    let pid = target.pid;
    let sites = sites_in(pid, &target.exe);
    let original = site_bytes(pid, &sites);
    let parent_fds = target.snapshot().fds;
    let dir = fresh("forking.data");
    let mut rec = textpoke(&sockets)
        .args(["record", "--duration", "60", "-p", &pid.to_string(), "-o"])
        .arg(&dir)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(rec.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("attached to process"), "{line}");
    let child = target.fork();
    std::thread::sleep(Duration::from_millis(300));
    assert_ne!(site_bytes(child, &sites), original, "the child inherited patched sites");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(rec.id() as i32, libc::SIGINT) };
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert!(rec.wait().unwrap().success(), "{rest}");
    assert!(rest.contains("1 child trace") && !rest.contains("incomplete"), "{rest}");
    let child_dir = dir.join(format!("child-{child}"));
    let (ok, why) = settle(|| {
        let complete = Trace::open(&child_dir).is_ok_and(|t| t.is_complete());
        let bytes = site_bytes(child, &sites) == original;
        let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{child}/task"))
            .unwrap()
            .flatten()
            .map(|t| std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim_end().to_string())
            .collect();
        let agents = tasks.iter().filter(|c| c.starts_with("textpoke") && c.as_str() != RECLAIMER).count();
        // The child's descriptors are those it inherited from the program.
        let extra: Vec<String> = std::fs::read_dir(format!("/proc/{child}/fd"))
            .unwrap()
            .flatten()
            .filter(|e| !parent_fds.contains_key(&*e.file_name().to_string_lossy()))
            .map(|e| format!("{:?} -> {:?}", e.file_name(), std::fs::read_link(e.path()).unwrap_or_default()))
            .collect();
        let socket = sockets.join(format!("{child}.sock")).exists();
        let ok = complete && bytes && agents == 0 && extra.is_empty() && !socket;
        (
            ok,
            (
                ok,
                format!(
                    "complete {complete}, sites back {bytes}, threads {tasks:?}, extra fds {extra:?}, socket {socket}"
                ),
            ),
        )
    });
    // SAFETY: the target's child, which the test made it fork.
    unsafe { libc::kill(child, libc::SIGKILL) };
    assert!(ok, "the child after its parent's detach: {why}\n{rest}");
    let trace = Trace::open(&child_dir).unwrap();
    let counts: BTreeMap<String, u64> = trace.counts().iter().map(|&(f, n)| (trace.name(f).to_string(), n)).collect();
    assert!(counts.get("t_work").copied().unwrap_or(0) > 0, "{counts:?}");
    println!("{}", target.finish());
}
