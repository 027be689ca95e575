//! Library calls (issue #15): `textpoke record` traces a program's calls
//! into libc through the PLT by default, as uftrace does, with exact
//! counts from 8 threads; `ctl disable`/`enable` switch them off and back
//! on while the program runs; `--no-libcall` records none.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use textpoke_record::tracedata::{RecordKind, Trace};

fn work_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("textpoke-libcall-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

const PROG: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define N 1000
static volatile size_t sink;
static void *work(void *arg) {
    for (long i = 0; i < N; i++) {
        char *p = malloc(16 + (i & 7));
        p[0] = 'x'; p[1] = 0;
        sink += strlen(p);
        free(p);
    }
    return arg;
}
static void phase(int k) {
    pthread_t t[8];
    for (int i = 0; i < 8; i++) pthread_create(&t[i], 0, work, 0);
    for (int i = 0; i < 8; i++) pthread_join(t[i], 0);
    printf("done %d\n", k);
    fflush(stdout);
}
int main(void) {
    char line[64];
    printf("%d\n", (int)getpid());
    fflush(stdout);
    for (int k = 1; k <= 3; k++) {
        phase(k);
        if (k < 3 && !fgets(line, sizeof line, stdin)) return 1;
    }
    return 0;
}
"#;

fn prog() -> PathBuf {
    let dir = work_dir();
    let (c, exe) = (dir.join("libcalls.c"), dir.join("libcalls"));
    std::fs::write(&c, PROG).unwrap();
    let out = Command::new("gcc")
        .args(["-O1", "-fno-builtin", "-pthread", "-fpatchable-function-entry=5", "-o"])
        .arg(&exe)
        .arg(&c)
        .output()
        .expect("gcc must be installed");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    exe
}

fn textpoke(sockets: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_textpoke"));
    c.env("TEXTPOKE_SOCKET_DIR", sockets).current_dir(work_dir());
    c
}

/// (entries, exits) per function name; entries and exits balance per thread.
fn tally(dir: &Path) -> BTreeMap<String, (u64, u64)> {
    let trace = Trace::open(dir).unwrap();
    assert!(trace.is_complete());
    assert_eq!(trace.dropped(), 0);
    let mut total: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for th in trace.threads() {
        for r in trace.records(th).unwrap() {
            let r = r.unwrap();
            let t = total.entry(trace.name(r.func).to_string()).or_default();
            match r.kind {
                RecordKind::Entry => t.0 += 1,
                RecordKind::Exit => t.1 += 1,
                RecordKind::Gap => panic!("events lost"),
                RecordKind::Cut => {}
            }
        }
    }
    total
}

fn sockets(name: &str) -> PathBuf {
    let d = work_dir().join(format!("sock-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    d
}

#[test]
fn libc_calls_exact_and_switched_while_running() {
    let exe = prog();
    let socks = sockets("on");
    let dir = work_dir().join("on.data");
    let _ = std::fs::remove_dir_all(&dir);
    let mut child = textpoke(&socks)
        .arg("record")
        .arg("-o")
        .arg(&dir)
        .arg(&exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let pid: i32 = line.trim().parse().unwrap();
    let sock = socks.join(format!("{pid}.sock"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no agent socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let ctl = |args: &[&str]| {
        let o = textpoke(&socks).arg("ctl").arg(pid.to_string()).args(args).output().unwrap();
        assert!(o.status.success(), "ctl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    let mut stdin = child.stdin.take().unwrap();
    let mut next = |k: i32| {
        line.clear();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), format!("done {k}"));
    };
    next(1);
    ctl(&["disable", "malloc"]); // phase 2: malloc off, the others on
    stdin.write_all(b"go\n").unwrap();
    next(2);
    ctl(&["enable", "malloc"]); // phase 3: on again
    stdin.write_all(b"go\n").unwrap();
    next(3);
    drop(stdin);
    let status = child.wait().unwrap();
    assert!(status.success());
    let got = tally(&dir);
    let n = 8 * 1000;
    assert_eq!(got["malloc"], (2 * n, 2 * n), "phases 1 and 3");
    assert_eq!(got["strlen"], (3 * n, 3 * n));
    assert_eq!(got["free"], (3 * n, 3 * n));
    assert_eq!(got["pthread_create"], (24, 24));
    assert_eq!(got["pthread_join"], (24, 24));
    assert_eq!(got["work"], (24, 24), "the program's own functions as before");

    // --no-libcall: the program's functions only.
    let socks = sockets("off");
    let dir = work_dir().join("off.data");
    let _ = std::fs::remove_dir_all(&dir);
    let o = textpoke(&socks)
        .args(["record", "--no-libcall", "-o"])
        .arg(&dir)
        .arg(&exe)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    // stdin is empty: phase 1 only, then main returns 1.
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let got = tally(&dir);
    assert_eq!(got["work"], (8, 8));
    assert!(!got.contains_key("malloc") && !got.contains_key("pthread_create"), "{got:?}");
}
