//! `textpoke` as one file: a copy of the binary alone in a directory, and
//! the binary `cargo install --path crates/textpoke-cli` installs, record a
//! program with the agent they carry (`src/agent_file.rs`), written once
//! to a private file, reused, and replaced when altered.
//!
//! The install test builds the workspace in release (`cargo install`'s
//! profile) into `CARGO_TARGET_TMPDIR/install-target`, which is kept
//! between runs: the first run takes minutes (about 8 on 2 shared cores),
//! later ones only rebuild what changed (seconds when nothing did).

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

const AGENT: &str = "libtextpoke_agent.so";

/// A fresh directory for one test, under the target's temporary directory.
fn fresh(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("install-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Two threads; `leaf` is called 7 + 5 times, `mid` 7 times. Prints the
/// path of the agent it finds mapped in `/proc/self/maps` (a file named
/// libtextpoke_agent.so, as `textpoke ctl` recognises it).
const PROG_C: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <string.h>
static volatile int sink;
__attribute__((noinline)) int leaf(int x) { sink += x; return x * 2; }
__attribute__((noinline)) int mid(int x) { return leaf(x) + 1; }
__attribute__((noinline)) void *worker(void *a) { for (int i = 0; i < 5; i++) leaf(i); return a; }
int main(void) {
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    int s = 0;
    for (int i = 0; i < 7; i++) s += mid(i);
    pthread_join(t, NULL);
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[4096];
    while (maps && fgets(line, sizeof line, maps)) {
        char *path = strchr(line, '/');
        size_t n = strlen(line);
        if (path && n > 21 && strcmp(line + n - 22, "/libtextpoke_agent.so\n") == 0) {
            printf("agent %s", path);
            break;
        }
    }
    printf("sum %d\n", s);
    return 0;
}
"#;

/// Compiles [`PROG_C`] into `dir/prog` with patchable function entries.
fn compile(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let (c, exe) = (dir.join("prog.c"), dir.join("prog"));
    std::fs::write(&c, PROG_C).unwrap();
    let out = Command::new("gcc")
        .args(["-O1", "-pthread", "-fpatchable-function-entry=5", "-o"])
        .arg(&exe)
        .arg(&c)
        .output()
        .expect("gcc must be installed to build the test program");
    assert!(out.status.success(), "gcc: {}", text(&out.stderr));
    exe
}

/// Runs `textpoke ARGS` in `cwd` with nothing pointing at an agent, the
/// cache in `cache`, sockets in `cwd/sock`.
fn textpoke(exe: &Path, cwd: &Path, cache: &Path, args: &[&str]) -> Output {
    let sockets = cwd.join("sock");
    std::fs::create_dir_all(&sockets).unwrap();
    std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(0o700)).unwrap();
    Command::new(exe)
        .args(args)
        .current_dir(cwd)
        .env_remove("TEXTPOKE_AGENT")
        .env_remove("LD_PRELOAD")
        .env("XDG_CACHE_HOME", cache)
        .env("TEXTPOKE_SOCKET_DIR", &sockets)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Records the program in `work/run` (not where `exe` or the program are)
/// and checks the report: exact calls per function. Returns the agent
/// path the program printed.
fn record_and_report(exe: &Path, work: &Path, prog: &Path) -> PathBuf {
    let run = work.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let _ = std::fs::remove_dir_all(run.join("t.data"));
    let cache = work.join("cache");
    let out = textpoke(exe, &run, &cache, &["record", "--no-libcall", "-o", "t.data", "--", prog.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "record: {}\n{stdout}", text(&out.stderr));
    assert!(stdout.contains("sum 49"), "{stdout}");
    let mapped = stdout.lines().find_map(|l| l.strip_prefix("agent ")).unwrap_or_else(|| panic!("no agent: {stdout}"));

    let out = textpoke(exe, &run, &cache, &["report", "-i", "t.data", "--format", "csv"]);
    assert!(out.status.success(), "report: {}", text(&out.stderr));
    let calls: BTreeMap<String, u64> = text(&out.stdout)
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_string(), f[1].parse().unwrap())
        })
        .collect();
    let expected: BTreeMap<String, u64> =
        [("main", 1), ("mid", 7), ("leaf", 12), ("worker", 1)].into_iter().map(|(f, n)| (f.into(), n)).collect();
    assert_eq!(calls, expected);
    PathBuf::from(mapped)
}

/// The whole story for a `textpoke` alone in its directory: the agent is
/// written under `work/cache`, used, reused, replaced when altered.
/// `agent` is the file the binary was built to carry.
fn works_alone(exe: &Path, work: &Path, agent: &Path) {
    let carried = std::fs::read(agent).unwrap();
    assert!(!carried.is_empty(), "{} is a built agent", agent.display());
    for sibling in [exe.with_file_name(AGENT), exe.with_file_name("deps").join(AGENT)] {
        assert!(!sibling.exists(), "{} must not exist for this test", sibling.display());
    }
    let prog = compile(&work.join("src"));

    let mapped = record_and_report(exe, work, &prog);
    let cache = work.join("cache").canonicalize().unwrap();
    let written: Vec<PathBuf> = std::fs::read_dir(cache.join("textpoke")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(written.len(), 1, "{written:?}");
    let file = written[0].join(AGENT);
    assert_eq!(mapped, file, "the program loaded the written copy");
    assert_eq!(std::fs::read(&file).unwrap(), carried, "the copy is the agent the binary was built with");
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
    assert_eq!((mode(&cache.join("textpoke")), mode(&written[0]), mode(&file)), (0o700, 0o700, 0o500));

    // A second run uses the same file as it is.
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(record_and_report(exe, work, &prog), file);
    let again = std::fs::metadata(&file).unwrap();
    assert_eq!((again.ino(), again.mtime_nsec(), again.mtime()), (meta.ino(), meta.mtime_nsec(), meta.mtime()));

    // An altered copy (same size, one byte in the middle) is replaced.
    let mut altered = carried.clone();
    altered[carried.len() / 2] ^= 0x40;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(&file, &altered).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o500)).unwrap();
    let held = std::fs::File::open(&file).unwrap(); // so that its inode is not reused
    assert_eq!(record_and_report(exe, work, &prog), file);
    assert_eq!(std::fs::read(&file).unwrap(), carried, "the altered copy was written anew");
    assert_ne!(std::fs::metadata(&file).unwrap().ino(), held.metadata().unwrap().ino(), "replaced, not rewritten");
    assert_eq!(mode(&file), 0o500);
}

/// A hard link to (or else a copy of) `from` at `to`.
fn link_or_copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).unwrap();
    }
}

/// The binary under test, alone in a directory (what a user who copies
/// it gets): the debug build carries its agent as the release one does.
#[test]
fn a_copied_textpoke_records_with_the_agent_it_carries() {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_textpoke"));
    let work = fresh("copy");
    let exe = work.join("bin/textpoke");
    link_or_copy(&built, &exe);
    works_alone(&exe, &work, &built.parent().unwrap().join("deps").join(AGENT));
    std::fs::remove_dir_all(&work).unwrap();
}

/// No place where the copy may be written: the error says what was tried
/// and what to do, and nothing is run.
#[test]
fn with_nowhere_to_write_the_agent_textpoke_says_what_it_tried() {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_textpoke"));
    let work = fresh("nowhere");
    let exe = work.join("bin/textpoke");
    link_or_copy(&built, &exe);
    let open = work.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let prog = compile(&work.join("src"));
    let out = Command::new(&exe)
        .args(["record", "-o"])
        .arg(work.join("t.data"))
        .arg("--")
        .arg(&prog)
        .env_remove("TEXTPOKE_AGENT")
        .env_remove("XDG_RUNTIME_DIR")
        .env("XDG_CACHE_HOME", &open)
        .env("TMPDIR", &open)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let open = open.canonicalize().unwrap();
    for part in [
        format!("there is no {AGENT} beside {}", exe.display()),
        format!("{}/textpoke: {} is writable by other users (777)", open.display(), open.display()),
        "XDG_RUNTIME_DIR is not set".into(),
        format!("{}/textpoke-", open.display()),
        "Set XDG_CACHE_HOME to a directory of yours, or TEXTPOKE_AGENT".into(),
    ] {
        assert!(err.contains(&part), "{part:?} in {err}");
    }
    assert!(!work.join("t.data").exists(), "the program did not run");
    std::fs::remove_dir_all(&work).unwrap();
}

/// `cargo install --path crates/textpoke-cli` into a fresh root: one file,
/// `bin/textpoke`, which records alone (see the module docs for the time
/// it takes).
#[test]
fn cargo_install_gives_a_textpoke_that_works_alone() {
    let work = fresh("cargo-install");
    let root = work.join("root");
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("install-target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = Instant::now();
    let out = Command::new(cargo)
        .args(["install", "--locked", "--offline", "--path", env!("CARGO_MANIFEST_DIR"), "--root"])
        .arg(&root)
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    eprintln!("cargo install took {:.0?}", started.elapsed());
    assert!(out.status.success(), "cargo install: {}", text(&out.stderr));

    let mut installed: Vec<String> = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                installed.push(p.strip_prefix(&root).unwrap().display().to_string());
            }
        }
    }
    installed.retain(|p| !p.starts_with(".crates")); // cargo's own records
    assert_eq!(installed, ["bin/textpoke"], "one file is installed");
    works_alone(&root.join("bin/textpoke"), &work, &target.join("release/deps").join(AGENT));
    std::fs::remove_dir_all(&work).unwrap();
}
