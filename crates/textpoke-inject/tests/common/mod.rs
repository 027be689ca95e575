//! Helpers shared by the integration tests: C fixtures compiled with gcc
//! at test time, and the target processes they run as.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;

/// Where fixtures are built (per test process: tests run in parallel).
fn build_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("textpoke-inject-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Compiles fixture `src` with gcc and `flags` into `out` (in the build
/// directory), once per test process (tests run in parallel: rewriting a
/// binary another test is starting fails with ETXTBSY); returns its path.
pub fn gcc(src: &str, out: &str, flags: &[&str]) -> PathBuf {
    static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut built = BUILT.lock().unwrap();
    if let Some(p) = built.get(out) {
        return p.clone();
    }
    let path = build_dir().join(out);
    let o = Command::new("gcc")
        .args(["-O2", "-Wall", "-o"])
        .arg(&path)
        .arg(fixture(src))
        .args(flags)
        .output()
        .unwrap_or_else(|e| panic!("gcc must be installed to build the test fixtures: {e}"));
    assert!(o.status.success(), "gcc {src}: {}", String::from_utf8_lossy(&o.stderr));
    built.insert(out.to_string(), path.clone());
    path
}

/// The object the tests inject.
pub fn hello_so() -> PathBuf {
    gcc("hello.c", "libhello.so", &["-shared", "-fPIC", "-pthread"])
}

/// A running fixture program that printed its start-up lines.
pub struct Proc {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub stdout: BufReader<ChildStdout>,
    /// The lines it printed before `ready`.
    pub lines: Vec<String>,
}

impl Proc {
    /// Runs `exe` with `args` and reads its stdout up to the `ready` line.
    pub fn spawn(exe: &Path, args: &[&str]) -> Proc {
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            assert!(stdout.read_line(&mut l).unwrap() > 0, "{} exited before it was ready", exe.display());
            let l = l.trim().to_string();
            if l.starts_with("ready") || l.starts_with("seized") {
                break;
            }
            lines.push(l);
        }
        Proc { child, stdin, stdout, lines }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The tid of the thread that printed `role NAME TID`.
    pub fn role(&self, name: &str) -> i32 {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("role {name} ")))
            .unwrap_or_else(|| panic!("no role {name}"))
            .parse()
            .unwrap()
    }

    /// Closes its stdin (the fixtures' signal to finish) and returns its
    /// exit code and the rest of its stdout.
    pub fn finish(mut self) -> (i32, String) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"q\n");
        }
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut self.stdout, &mut rest);
        let status = self.child.wait().unwrap();
        (status.code().unwrap_or(-1), rest)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Field `name` of /proc/PID/status (or of a task's).
pub fn status_field(path: &str, name: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

/// The state letter of process `pid`.
pub fn state(pid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')').map(|(_, r)| r.trim_start().chars().next().unwrap_or('?')).unwrap_or('?')
}

/// The thread ids of `pid`.
pub fn tasks(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// The open descriptors of `pid`.
pub fn fds(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// Asserts that `pid` is alive, not stopped and not traced.
pub fn assert_running_untraced(pid: i32) {
    let st = state(pid);
    assert!(matches!(st, 'R' | 'S'), "process {pid} is in state {st}");
    for tid in tasks(pid) {
        let tracer = status_field(&format!("/proc/{pid}/task/{tid}/status"), "TracerPid");
        assert_eq!(tracer, "0", "thread {tid} of {pid} is traced by {tracer}");
    }
}
