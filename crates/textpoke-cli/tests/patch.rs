//! `textpoke patch` (issue 12) on running C programs built here: 8 worker
//! threads call `outer()`, which calls `inner()`; every version of the
//! pair returns `100 * v + v` (`101` the original, `202` patch v2...), so
//! a thread that ran one function's old version and the other's new one
//! sees a mixed value (`102`, `201`) and the program counts it. A sleeper
//! (`nanosleep`) and a reader (`read` on a pipe the main thread feeds)
//! count every `EINTR` and every short sleep. The main thread prints a
//! status line every 20 ms.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

const INCLUDE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../textpoke-c/include");

/// What a target must be built with to be patched without a signal to any
/// thread: NOP5 entry sites (mcount), no interprocedural assumptions.
const TARGET_FLAGS: &[&str] = &[
    "-O2",
    "-pthread",
    "-pg",
    "-mfentry",
    "-mnop-mcount",
    "-mrecord-mcount",
    "-fno-pie",
    "-no-pie",
    "-flive-patching=inline-clone",
    "-Wl,--build-id",
];

const TARGET_C: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

static atomic_long calls, mixed, eintr, sleeps, reads;
static atomic_int last;
static int feed[2], never[2];

__attribute__((noipa)) int inner(int x) { return 1 + (x & 0); }
__attribute__((noipa)) int outer(int x) { return 100 + inner(x); }
/* Blocks in read() inside itself until the pipe is written (never). */
__attribute__((noipa)) int holder(int fd) { char c; return (int)read(fd, &c, 1) + inner(0); }

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *worker(void *a) {
    (void)a;
    prctl(PR_SET_NAME, "worker");
    for (int i = 0;; i++) {
        int r = outer(i);
        if (r / 100 != r % 100) {
            atomic_fetch_add(&mixed, 1);
            fprintf(stderr, "MIXED %d\n", r);
        }
        atomic_fetch_add_explicit(&calls, 1, memory_order_relaxed);
        atomic_store_explicit(&last, r, memory_order_relaxed);
    }
    return 0;
}

static void *sleeper(void *a) {
    (void)a;
    prctl(PR_SET_NAME, "sleeper");
    for (;;) {
        struct timespec ts = {0, 3000000};
        double t0 = now();
        int rc = nanosleep(&ts, NULL);
        if (rc != 0 || now() - t0 < 0.003) {
            atomic_fetch_add(&eintr, 1);
            fprintf(stderr, "EINTR nanosleep rc %d errno %d\n", rc, errno);
        }
        atomic_fetch_add(&sleeps, 1);
    }
    return 0;
}

static void *reader(void *a) {
    (void)a;
    prctl(PR_SET_NAME, "reader");
    for (;;) {
        char c;
        ssize_t n = read(feed[0], &c, 1);
        if (n != 1) {
            atomic_fetch_add(&eintr, 1);
            fprintf(stderr, "EINTR read %zd errno %d\n", n, errno);
        }
        atomic_fetch_add(&reads, 1);
    }
    return 0;
}

static void *blocked(void *a) {
    (void)a;
    prctl(PR_SET_NAME, "blocked");
    holder(never[0]);
    return 0;
}

int main(int argc, char **argv) {
    if (pipe(feed) || pipe(never)) return 1;
    pthread_t t;
    for (int i = 0; i < 8; i++) pthread_create(&t, 0, worker, 0);
    pthread_create(&t, 0, sleeper, 0);
    pthread_create(&t, 0, reader, 0);
    if (argc > 1 && strcmp(argv[1], "hold") == 0) pthread_create(&t, 0, blocked, 0);
    for (;;) {
        usleep(20000);
        if (write(feed[1], "x", 1) != 1) return 1;
        printf("status last=%d calls=%ld mixed=%ld eintr=%ld sleeps=%ld reads=%ld\n", atomic_load(&last),
               atomic_load(&calls), atomic_load(&mixed), atomic_load(&eintr), atomic_load(&sleeps),
               atomic_load(&reads));
        fflush(stdout);
    }
}
"#;

/// One patch of `outer` and `inner` (and `holder` with -DHOLD): version
/// `V`, its outer calling the program's `inner` through its site (a
/// symbol slot), so that a thread not yet switched gets the old `inner`.
const PATCH_C: &str = r#"
#include <textpoke.h>

TEXTPOKE_LIVEPATCH_NAME(NAME);
TEXTPOKE_LIVEPATCH_OBJECT(NULL, BUILD_ID);
#ifdef REPLACE
TEXTPOKE_LIVEPATCH_REPLACE();
#endif

typedef int (*fn_t)(int);
TEXTPOKE_LIVEPATCH_SYMBOL(fn_t, inner_p, inner);

static int inner_v(int x) { return V + (x & 0); }
static int outer_v(int x) { return 100 * V + inner_p(x); }
TEXTPOKE_LIVEPATCH(inner, inner_v);
TEXTPOKE_LIVEPATCH(outer, outer_v);
#ifdef HOLD
static int holder_v(int fd) { (void)fd; return inner_p(0); }
TEXTPOKE_LIVEPATCH(holder, holder_v);
#endif
"#;

fn work_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("patch-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn gcc(args: &[&str]) {
    let out = Command::new("gcc").args(args).output().expect("gcc must be installed to build the test programs");
    assert!(out.status.success(), "gcc {args:?}: {}", text(&out.stderr));
}

/// The target program, built once per test binary.
fn target() -> PathBuf {
    static T: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let dir = work_dir();
        let (c, exe) = (dir.join("lp_target.c"), dir.join("lp_target"));
        std::fs::write(&c, TARGET_C).unwrap();
        let mut args = vec!["-o", exe.to_str().unwrap(), c.to_str().unwrap()];
        args.extend(TARGET_FLAGS);
        gcc(&args);
        exe
    })
    .clone()
}

fn build_id(path: &Path) -> String {
    let out = Command::new("readelf").arg("-n").arg(path).output().expect("readelf");
    let t = text(&out.stdout);
    t.lines().find_map(|l| l.trim().strip_prefix("Build ID: ")).expect("a build-id").trim().to_owned()
}

/// Patch version `v` named `name`; `extra`: -DREPLACE, -DHOLD.
fn patch(name: &str, v: u32, build_id: &str, extra: &[&str]) -> PathBuf {
    let dir = work_dir();
    let c = dir.join("lp_patch.c");
    if !c.exists() {
        std::fs::write(&c, PATCH_C).unwrap();
    }
    let so = dir.join(format!("{name}.so"));
    let (n, v, b) = (format!("-DNAME=\"{name}\""), format!("-DV={v}"), format!("-DBUILD_ID=\"{build_id}\""));
    let mut args = vec!["-O2", "-shared", "-fPIC", "-Wall", "-Werror", "-I", INCLUDE, "-o", so.to_str().unwrap()];
    args.extend([c.to_str().unwrap(), &n, &v, &b]);
    args.extend(extra);
    gcc(&args);
    so
}

/// A running target, its status lines on a channel.
struct Target {
    child: Child,
    lines: Receiver<String>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Status {
    last: i64,
    calls: i64,
    mixed: i64,
    eintr: i64,
    sleeps: i64,
    reads: i64,
}

impl Status {
    fn parse(line: &str) -> Option<Status> {
        let rest = line.strip_prefix("status ")?;
        let mut s = Status::default();
        for kv in rest.split(' ') {
            let (k, v) = kv.split_once('=')?;
            let v: i64 = v.parse().ok()?;
            match k {
                "last" => s.last = v,
                "calls" => s.calls = v,
                "mixed" => s.mixed = v,
                "eintr" => s.eintr = v,
                "sleeps" => s.sleeps = v,
                "reads" => s.reads = v,
                _ => return None,
            }
        }
        Some(s)
    }
}

impl Target {
    fn start(args: &[&str]) -> Target {
        let mut child = Command::new(target())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out: ChildStdout = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { return };
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let t = Target { child, lines: rx };
        // Running: every worker has called outer().
        t.until(|s| s.calls > 1000 && s.reads > 2, "the target starts");
        t
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The next status line (other lines: `textpoke record`'s).
    fn status(&self) -> Status {
        loop {
            let l = self.lines.recv_timeout(Duration::from_secs(20)).expect("the target prints a status line");
            if let Some(s) = Status::parse(&l) {
                return s;
            }
        }
    }

    /// Waits for a status line satisfying `ok`.
    fn until(&self, ok: impl Fn(&Status) -> bool, what: &str) -> Status {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status();
            if ok(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}: last status {s:?}");
        }
    }

    /// Status lines printed from now on only: the channel holds every
    /// line since the last look (a `textpoke patch` taking a second
    /// leaves fifty), and a line printed while the transition was under
    /// way shows a worker's value from before it switched. (Reading that
    /// backlog, `settled(505)` saw `last=101` a line after `last=505` in 2
    /// runs of 80 although every worker had switched long before: the
    /// lines were from the first milliseconds of the transition.) A line
    /// printed just before the call may still be on its way: one more is
    /// dropped. Returns how many were dropped.
    fn fresh(&self) -> usize {
        let mut stale = 0;
        while self.lines.try_recv().is_ok() {
            stale += 1;
        }
        self.status();
        stale + 1
    }

    /// A few status lines later (every worker ran on since), the value
    /// they all return now, checking nothing mixed and no EINTR.
    fn settled(&self, want: i64) -> Status {
        let stale = self.fresh();
        let s = self.until(|s| s.last == want, &format!("the workers return {want}"));
        let later = self.until(|t| t.calls > s.calls + 10_000, "the workers run on");
        assert_eq!(later.last, want, "{stale} status lines from before were dropped");
        assert_eq!(later.mixed, 0, "a thread ran one old and one new function");
        assert_eq!(later.eintr, 0, "a blocked thread saw EINTR or a short sleep");
        later
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn textpoke(args: &[&str]) -> Output {
    let dir = work_dir().join("sockets");
    if !dir.exists() {
        std::fs::create_dir(&dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    Command::new(env!("CARGO_BIN_EXE_textpoke"))
        .args(args)
        .env("TEXTPOKE_SOCKET_DIR", &dir)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn patch_cmd(pid: i32, args: &[&str]) -> Output {
    let pid = pid.to_string();
    let mut all = vec!["patch", pid.as_str()];
    all.extend(args);
    textpoke(&all)
}

#[track_caller]
fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Exit code 1 and stderr.
#[track_caller]
fn refused(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "stdout: {}\nstderr: {}", text(&out.stdout), text(&out.stderr));
    text(&out.stderr)
}

fn threads_named(pid: i32, prefix: &str) -> Vec<String> {
    let mut names = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        if let Ok(c) = std::fs::read_to_string(t.path().join("comm")) {
            if c.starts_with(prefix) {
                names.push(c.trim_end().to_owned());
            }
        }
    }
    names
}

#[test]
fn patch_list_stack_revert_and_replace_an_8_thread_program() {
    let exe = target();
    let id = build_id(&exe);
    let t = Target::start(&[]);
    let pid = t.pid();
    t.settled(101);

    let v2 = patch("fix-v2", 2, &id, &[]);
    let out = ok(&patch_cmd(pid, &[v2.to_str().unwrap()]));
    assert!(out.starts_with("patched inner(), outer() in "), "{out}");
    assert!(out.contains(" threads switched"), "{out}");
    t.settled(202);
    // The agent's live-patch thread ended with the transition; the
    // session's thread with the command.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !threads_named(pid, "textpoke").is_empty() {
        assert!(Instant::now() < deadline, "textpoke threads stay: {:?}", threads_named(pid, "textpoke"));
        std::thread::sleep(Duration::from_millis(10));
    }

    // Stacked: v3 over v2; v2 cannot be reverted under it.
    let v3 = patch("fix-v3", 3, &id, &[]);
    ok(&patch_cmd(pid, &[v3.to_str().unwrap()]));
    t.settled(303);
    let list = ok(&patch_cmd(pid, &["--list"]));
    let rows: Vec<&str> = list.lines().collect();
    assert_eq!(rows.len(), 3, "{list}");
    assert!(rows[0].starts_with("ID") && rows[0].contains("FUNCTIONS"), "{list}");
    assert!(rows[1].starts_with("1 ") && rows[1].contains("fix-v2") && rows[1].contains("enabled"), "{list}");
    assert!(rows[2].starts_with("2 ") && rows[2].contains("fix-v3") && rows[2].contains("inner(), outer()"), "{list}");
    let err = refused(&patch_cmd(pid, &["--revert", "1"]));
    assert!(err.contains("patch 2 (fix-v3) is stacked on patch 1 (fix-v2)") && err.contains("revert 2 first"), "{err}");
    t.settled(303);

    // Revert the newest: back to v2, with the same consistency.
    let out = ok(&patch_cmd(pid, &["--revert"]));
    assert!(out.starts_with("reverted patch 2 (fix-v3): inner(), outer() in "), "{out}");
    t.settled(202);
    let list = ok(&patch_cmd(pid, &["--list"]));
    assert!(!list.contains("fix-v3") && list.contains("fix-v2"), "{list}");

    // Atomic replace: v4 replaces every earlier patch.
    ok(&patch_cmd(pid, &[v3.to_str().unwrap()]));
    t.settled(303);
    let v4 = patch("fix-v4", 4, &id, &["-DREPLACE"]);
    ok(&patch_cmd(pid, &[v4.to_str().unwrap()]));
    t.settled(404);
    let list = ok(&patch_cmd(pid, &["--list"]));
    let rows: Vec<&str> = list.lines().collect();
    assert_eq!(rows.len(), 2, "only the replace patch is left: {list}");
    assert!(rows[1].contains("fix-v4") && rows[1].trim_end().ends_with("yes"), "{list}");

    // Reverting it gives the original code back.
    ok(&patch_cmd(pid, &["--revert"]));
    t.settled(101);
    assert!(ok(&patch_cmd(pid, &["--list"])).contains("no patch is applied"));
    assert!(ok(&patch_cmd(pid, &["--report"])).contains("no transition is in progress"));
}

#[test]
fn a_patch_for_another_build_is_refused_and_the_process_untouched() {
    let t = Target::start(&[]);
    let pid = t.pid();
    let wrong = "00112233445566778899aabbccddeeff00112233";
    let so = patch("fix-wrong", 7, wrong, &[]);
    let err = refused(&patch_cmd(pid, &[so.to_str().unwrap()]));
    assert!(err.contains(wrong), "the patch's id shown: {err}");
    assert!(err.contains(&build_id(&target())), "the process's id shown: {err}");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(!maps.contains("libtextpoke_agent"), "the agent was loaded");
    assert!(!maps.contains("fix-wrong"), "the patch was loaded");
    t.settled(101);
}

#[test]
fn a_thread_inside_an_old_function_keeps_the_transition_pending_until_forced() {
    let exe = target();
    let t = Target::start(&["hold"]);
    let pid = t.pid();
    let blocked: i32 = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let tid = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten().find_map(|e| {
                let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
                (comm.trim_end() == "blocked").then(|| e.file_name().to_str()?.parse().ok())?
            });
            if let Some(tid) = tid {
                break tid;
            }
            assert!(Instant::now() < deadline, "no blocked thread");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    std::thread::sleep(Duration::from_millis(100)); // in read() by now
    let so = patch("fix-hold", 5, &build_id(&exe), &["-DHOLD"]);
    let out = patch_cmd(pid, &[so.to_str().unwrap(), "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(2), "stdout: {}\nstderr: {}", text(&out.stdout), text(&out.stderr));
    let report = text(&out.stdout);
    assert!(report.contains("1 thread not switched"), "{report}");
    assert!(report.contains(&format!("tid {blocked} (blocked): holds holder() [old]")), "{report}");
    assert!(report.contains("blocked in read(2)"), "{report}");
    let err = text(&out.stderr);
    assert!(err.contains("--force") && err.contains("--revert") && err.contains("--report"), "{err}");
    // Every other thread switched: the workers run the new pair.
    t.settled(505);
    // Still pending, still reported; the list says so.
    let again = patch_cmd(pid, &["--report"]);
    assert_eq!(again.status.code(), Some(2));
    let report = text(&again.stdout);
    assert!(report.contains("1 thread not switched"), "only the blocked thread, not textpoke's: {report}");
    assert!(report.contains(&format!("tid {blocked} (blocked): holds holder() [old]")), "{report}");
    assert!(ok(&patch_cmd(pid, &["--list"])).contains("patching"));
    // The agent's live-patch thread drives it meanwhile.
    assert_eq!(threads_named(pid, "textpoke-live").len(), 1);

    let forced = ok(&patch_cmd(pid, &["--force"]));
    assert!(forced.contains("by force") && forced.contains("1 thread switched without a check"), "{forced}");
    assert!(forced.contains(&format!("tid {blocked} (blocked): holds holder() [old]")), "{forced}");
    let list = ok(&patch_cmd(pid, &["--list"]));
    assert!(list.contains("enabled") && list.contains(" yes "), "forced: {list}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !threads_named(pid, "textpoke-live").is_empty() {
        assert!(Instant::now() < deadline, "the live-patch thread stays after completion");
        std::thread::sleep(Duration::from_millis(10));
    }
    t.settled(505);
}

#[test]
fn a_program_under_record_is_patched_through_its_control_socket() {
    let exe = target();
    let dir = work_dir().join("recorded.data");
    let _ = std::fs::remove_dir_all(&dir);
    let sockets = work_dir().join("sockets");
    let _ = textpoke(&["--help"]); // makes the socket directory
    let mut child = Command::new(env!("CARGO_BIN_EXE_textpoke"))
        .args(["record", "-o", dir.to_str().unwrap(), "-F", "main", "--"])
        .arg(&exe)
        .env("TEXTPOKE_SOCKET_DIR", &sockets)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let t = Target { child, lines: rx };
    t.until(|s| s.calls > 1000, "the recorded program starts");
    // The program is textpoke's child's child: find it by its executable.
    let pid = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
                let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let ppid: u32 = stat[stat.rfind(')')? + 2..].split(' ').nth(1)?.parse().ok()?;
                (ppid == t.child.id() && std::fs::read_link(format!("/proc/{pid}/exe")).ok()? == exe).then_some(pid)
            });
            if let Some(p) = found {
                break p;
            }
            assert!(Instant::now() < deadline, "the recorded program is not found");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // The agent thread makes its socket while the program already runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sockets.join(format!("{pid}.sock")).exists() {
        assert!(Instant::now() < deadline, "the recorded program has no control socket after 10 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    let so = patch("fix-rec", 6, &build_id(&exe), &[]);
    let out = ok(&patch_cmd(pid, &[so.to_str().unwrap(), "-v"]));
    assert!(out.starts_with("patched inner(), outer()"), "{out}");
    t.settled(606);
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(maps.contains("libtextpoke_agent.so"), "the preloaded agent is there");
    assert!(threads_named(pid, "textpoke-attach").is_empty(), "nothing was injected");
    ok(&patch_cmd(pid, &["--revert"]));
    t.settled(101);
}

#[test]
fn bad_command_lines_are_refused_before_anything() {
    let out = textpoke(&["patch", "0", "x.so"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = textpoke(&["patch", "999999999", "--list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("does not exist"));
    let out = textpoke(&["patch", "1", "x.so", "--list"]);
    assert_eq!(out.status.code(), Some(2), "clap refuses the combination");
    // Completions and the manual page know the command.
    assert!(ok(&textpoke(&["completions", "bash"])).contains("textpoke__subcmd__patch"));
    let man = ok(&textpoke(&["man"]));
    assert!(man.contains("textpoke\\-patch(1)"), "textpoke.1 lists the command");
    let help = ok(&textpoke(&["patch", "--help"]));
    assert!(help.contains("--revert [<ID>]") && help.contains("--timeout <S>"), "{help}");
}
