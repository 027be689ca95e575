//! `textpoke patch --nudge` (issue 12, the kernel's fake signal): a C
//! program with a thread spinning in a loop that calls nothing, which no
//! check can switch, so the transition stays pending without the nudge and
//! completes with it; a sleeper thread (`nanosleep`) counts every `EINTR`
//! and short sleep, and must see none.
#![cfg(target_arch = "x86_64")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

const INCLUDE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../textpoke-c/include");

const TARGET_C: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

static atomic_long spins, eintr, sleeps;

__attribute__((noipa)) int f(void) { return 1; }
/* A pure loop: no call, no system call. */
__attribute__((noipa)) void spin(void) { for (;;) atomic_fetch_add_explicit(&spins, 1, memory_order_relaxed); }

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *spinner(void *a) {
    (void)a;
    prctl(PR_SET_NAME, "spinner");
    spin();
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

int main(void) {
    pthread_t t;
    pthread_create(&t, 0, spinner, 0);
    pthread_create(&t, 0, sleeper, 0);
    for (;;) {
        usleep(20000);
        printf("status f=%d spins=%ld eintr=%ld sleeps=%ld\n", f(), atomic_load(&spins), atomic_load(&eintr),
               atomic_load(&sleeps));
        fflush(stdout);
    }
}
"#;

const PATCH_C: &str = r#"
#include <textpoke.h>
TEXTPOKE_LIVEPATCH_OBJECT(NULL, BUILD_ID);
static int f_v2(void) { return 2; }
TEXTPOKE_LIVEPATCH(f, f_v2);
"#;

fn work_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("patch_nudge-{}", std::process::id()));
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

fn build_id(path: &Path) -> String {
    let out = Command::new("readelf").arg("-n").arg(path).output().expect("readelf");
    let t = text(&out.stdout);
    t.lines().find_map(|l| l.trim().strip_prefix("Build ID: ")).expect("a build-id").trim().to_owned()
}

/// The target (NOP5 mcount entries, no interprocedural assumptions) and
/// its patch.
fn build() -> (PathBuf, PathBuf) {
    let dir = work_dir();
    let (c, exe) = (dir.join("target.c"), dir.join("nudge_target"));
    std::fs::write(&c, TARGET_C).unwrap();
    gcc(&[
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
        "-o",
        exe.to_str().unwrap(),
        c.to_str().unwrap(),
    ]);
    let (pc, so) = (dir.join("patch.c"), dir.join("nudge_patch.so"));
    std::fs::write(&pc, PATCH_C).unwrap();
    let id = format!("-DBUILD_ID=\"{}\"", build_id(&exe));
    gcc(&[
        "-O2",
        "-shared",
        "-fPIC",
        "-Wall",
        "-Werror",
        "-I",
        INCLUDE,
        &id,
        "-o",
        so.to_str().unwrap(),
        pc.to_str().unwrap(),
    ]);
    (exe, so)
}

struct Target {
    child: Child,
    lines: Receiver<String>,
}

/// `(f, spins, eintr, sleeps)` of a status line.
type Status = (i64, i64, i64, i64);

impl Target {
    fn start(exe: &Path) -> Target {
        let mut child = Command::new(exe).stdin(Stdio::null()).stdout(Stdio::piped()).spawn().unwrap();
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
        t.until(|s| s.1 > 0 && s.3 > 2, "the target starts");
        t
    }

    fn status(&self) -> Status {
        loop {
            let l = self.lines.recv_timeout(Duration::from_secs(20)).expect("the target prints a status line");
            let v: Vec<i64> = l
                .strip_prefix("status ")
                .into_iter()
                .flat_map(|r| r.split(' '))
                .filter_map(|kv| kv.split_once('=')?.1.parse().ok())
                .collect();
            if let [f, spins, eintr, sleeps] = v[..] {
                return (f, spins, eintr, sleeps);
            }
        }
    }

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
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn patch_cmd(pid: i32, args: &[&str]) -> Output {
    let dir = work_dir().join("sockets");
    if !dir.exists() {
        std::fs::create_dir(&dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    Command::new(env!("CARGO_BIN_EXE_textpoke"))
        .args(["patch", &pid.to_string()])
        .args(args)
        .env("TEXTPOKE_SOCKET_DIR", &dir)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn show(out: &Output) -> String {
    format!("exit {:?}\nstdout: {}\nstderr: {}", out.status, text(&out.stdout), text(&out.stderr))
}

#[test]
fn a_spinning_thread_switches_only_when_nudged_and_no_sleep_is_interrupted() {
    let (exe, so) = build();
    let t = Target::start(&exe);
    let pid = t.child.id() as i32;
    let so = so.to_str().unwrap();

    // Without --nudge: pending on the spinner (exit 2), which runs.
    let out = patch_cmd(pid, &[so, "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let report = text(&out.stdout);
    assert!(report.lines().any(|l| l.contains("(spinner)") && l.contains("running")), "{}", show(&out));
    // Undone: the spinner holds the reversal too (it has never been
    // checked), until nudged.
    let out = patch_cmd(pid, &["--revert", "--nudge=0.05", "--timeout", "20"]);
    assert!(out.status.success(), "{}", show(&out));
    t.until(|s| s.0 == 1, "f() is the original again");

    // With --nudge: complete, no force.
    let out = patch_cmd(pid, &[so, "--nudge=0.05", "--timeout", "20"]);
    assert!(out.status.success(), "{}", show(&out));
    let said = text(&out.stdout);
    assert!(said.starts_with("patched f() in ") && !said.contains("forced"), "{}", show(&out));
    let s = t.until(|s| s.0 == 2, "f() is the patch's");
    let later = t.until(|l| l.1 > s.1 && l.3 > s.3 + 5, "the spinner and the sleeper run on");
    assert_eq!(later.2, 0, "the sleeper saw EINTR or a short sleep");
}
