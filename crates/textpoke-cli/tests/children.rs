//! A recorded program that starts traced programs: `report`, `replay`,
//! `dump` and `list` on its trace directory show every process (or the
//! one `--pid` picks), whether the program itself recorded anything or
//! not, and `record`'s last line counts what the children recorded. The
//! programs are C, built here with gcc's two kinds of patchable entries
//! (`-pg -mfentry -mnop-mcount -mrecord-mcount` and
//! `-fpatchable-function-entry`), run by a shell script.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

fn work_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("textpoke-children-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A fresh path under the work directory.
fn fresh(name: &str) -> PathBuf {
    let p = work_dir().join(name);
    let _ = std::fs::remove_dir_all(&p);
    let _ = std::fs::remove_file(&p);
    p
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `textpoke ARGS`, in the work directory, with a private socket
/// directory and no colour from the environment.
fn textpoke(args: &[&str]) -> Command {
    let sockets = work_dir().join("sockets");
    std::fs::create_dir_all(&sockets).unwrap();
    std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_textpoke"));
    c.args(args)
        .env("TEXTPOKE_SOCKET_DIR", &sockets)
        .env_remove("NO_COLOR")
        .env_remove("CLICOLOR_FORCE")
        .current_dir(work_dir())
        .stdin(Stdio::null());
    c
}

/// Runs `textpoke ARGS` on the trace `dir` (`-i DIR` appended); it must
/// succeed.
fn ok(args: &[&str], dir: &Path) -> Output {
    let o = textpoke(args).arg("-i").arg(dir).output().unwrap();
    assert!(o.status.success(), "textpoke {args:?}: {}", text(&o.stderr));
    o
}

/// `leaf` called N times (argv[1]) by `work`, called once by `main`.
const WORK_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
static volatile long sink;
__attribute__((noinline)) long leaf(long x) { sink += x; return x; }
__attribute__((noinline)) long work(int n) { long s = 0; for (int i = 0; i < n; i++) s += leaf(i); return s; }
int main(int argc, char **argv) { printf("%ld\n", work(argc > 1 ? atoi(argv[1]) : 1)); return 0; }
"#;

/// Compiles [`WORK_C`] with `flags` into `name`.
fn compile(name: &str, flags: &[&str]) -> PathBuf {
    let dir = work_dir();
    let (src, exe) = (dir.join(format!("{name}.c")), dir.join(name));
    std::fs::write(&src, WORK_C).unwrap();
    let out = Command::new("gcc")
        .args(["-O1", "-o"])
        .arg(&exe)
        .arg(&src)
        .args(flags)
        .output()
        .expect("gcc must be installed to build the test programs");
    assert!(out.status.success(), "gcc {name}: {}", text(&out.stderr));
    exe
}

/// The program built with mcount entries (`-pg -mfentry -mnop-mcount`,
/// which needs a non-PIE build) and with patchable function entries.
fn programs() -> &'static (PathBuf, PathBuf) {
    static P: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    P.get_or_init(|| {
        let mcount =
            compile("work-mcount", &["-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount", "-fno-pie", "-no-pie"]);
        let patchable = compile("work-patchable", &["-fpatchable-function-entry=5"]);
        (mcount, patchable)
    })
}

/// An executable shell script `name` with `body`.
fn script(name: &str, body: &str) -> PathBuf {
    let path = work_dir().join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// `textpoke record -o DIR -- PROG`; returns record's stderr.
fn record(dir: &Path, prog: &Path) -> String {
    let o = textpoke(&["record", "--no-libcall", "-o"]).arg(dir).arg("--").arg(prog).output().unwrap();
    assert!(o.status.success(), "record {}: {}", prog.display(), text(&o.stderr));
    text(&o.stderr)
}

/// The pid of each `# process` section of a report table, and the calls
/// of `leaf` in it.
fn leaf_calls(table: &str) -> Vec<(i32, u64)> {
    let mut out = Vec::new();
    for line in table.lines() {
        if let Some(rest) = line.strip_prefix("# process ") {
            let pid = rest.split("[pid ").nth(1).and_then(|r| r.split(']').next()).unwrap();
            out.push((pid.parse().unwrap(), 0));
        } else if line.trim_end().ends_with("  leaf") {
            let calls = line.split_whitespace().next().unwrap().parse().unwrap();
            out.last_mut().expect("a function line after a section heading").1 = calls;
        }
    }
    out
}

/// A shell script that runs three traced programs without exec records
/// nothing itself: record's last line counts what the three recorded, and
/// report, replay, dump and list show the three processes, or the one
/// `--pid` picks, each with its exact calls.
#[test]
fn a_script_running_three_traced_children() {
    let (mcount, patchable) = programs();
    let run3 = script("run3.sh", &format!("{m} 3\n{p} 4\n{m} 5\n", m = mcount.display(), p = patchable.display()));
    let dir = fresh("run3.data");
    let err = record(&dir, &run3);
    // main + work + leaf per child: 5, 6 and 7 calls.
    assert!(err.contains("ran no traced code itself; the 3 processes it started recorded 18 calls"), "{err}");
    assert!(!dir.join("meta.json").exists(), "the script recorded nothing itself");

    // report: an overview with each process's totals, then a section each,
    // in the order they ran.
    let o = ok(&["report"], &dir);
    let table = text(&o.stdout);
    assert!(text(&o.stderr).contains("holds no trace of its own"), "{}", text(&o.stderr));
    assert!(table.starts_with("# 3 processes, each in its section below (--pid PID for one):"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("#     total") && l.trim_end().ends_with(" 18")), "{table}");
    let sections = leaf_calls(&table);
    assert_eq!(sections.iter().map(|s| s.1).collect::<Vec<_>>(), [3, 4, 5], "{table}");
    assert!(table.contains("(started by the recorded program)"), "{table}");
    let pids: Vec<i32> = sections.iter().map(|s| s.0).collect();

    // --pid picks one process; an unknown pid is refused with the list.
    let second = pids[1].to_string();
    let one = text(&ok(&["report", "--pid", &second], &dir).stdout);
    assert_eq!(leaf_calls(&one), [(pids[1], 4)], "{one}");
    assert!(!one.contains("processes, each in its section"), "{one}");
    let o = textpoke(&["report", "--pid", "1", "-i"]).arg(&dir).output().unwrap();
    assert!(!o.status.success());
    let listed = pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
    assert!(
        text(&o.stderr).contains(&format!("no process 1 in this trace; its processes are: {listed}")),
        "{}",
        text(&o.stderr)
    );

    // JSON: the same, with origin and program.
    let json: serde_json::Value = serde_json::from_slice(&ok(&["report", "--format", "json"], &dir).stdout).unwrap();
    let procs = json["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 3);
    for p in procs {
        assert_eq!(p["origin"], "started");
        assert!(p["exe"].as_str().unwrap().contains("work-"), "{p}");
    }

    // replay: every process, one after the other; the note lists them and
    // says how to pick one.
    let o = ok(&["replay"], &dir);
    let (graph, note) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(graph.lines().filter(|l| l.starts_with("# process")).count(), 3, "{graph}");
    assert_eq!(graph.matches("leaf();").count(), 3 + 4 + 5, "{graph}");
    assert!(note.contains("3 processes in this trace") && note.contains("--pid PID for one"), "{note}");
    let graph = text(&ok(&["replay", "--pid", &second], &dir).stdout);
    assert_eq!(graph.matches("leaf();").count(), 4, "{graph}");

    // dump: the processes side by side (Chrome: one pid each; folded
    // stacks and the flame graph: a tower each, under a labelled root).
    let chrome: serde_json::Value = serde_json::from_slice(&ok(&["dump", "--chrome"], &dir).stdout).unwrap();
    let mut seen: Vec<i64> = chrome["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == "leaf")
        .map(|e| e["pid"].as_i64().unwrap())
        .collect();
    assert_eq!(seen.len(), 12);
    seen.dedup();
    assert_eq!(seen, pids.iter().map(|&p| p as i64).collect::<Vec<_>>());
    let folded = text(&ok(&["dump", "--folded"], &dir).stdout);
    for pid in &pids {
        assert!(folded.contains(&format!("[pid {pid}];main;work;leaf ")), "{folded}");
    }
    let svg = text(&ok(&["dump", "--flamegraph"], &dir).stdout);
    assert!(svg.contains(">all: 3 processes</text>"), "the root frame is labelled");

    // list: each process's functions under its heading.
    let listing = text(&ok(&["list"], &dir).stdout);
    assert_eq!(listing.lines().filter(|l| l.starts_with("# process")).count(), 3, "{listing}");
    assert_eq!(listing.lines().filter(|l| l.ends_with("  leaf")).count(), 3, "{listing}");
}

/// A subshell's commands are one level down, under a directory of the
/// subshell's that holds no trace: shown all the same, with the pid of the
/// subshell that started them.
#[test]
fn a_subshells_commands_are_shown_too() {
    let (mcount, patchable) = programs();
    let body = format!("{m} 2\nsh -c '{p} 3; {m} 4; true'\n", m = mcount.display(), p = patchable.display());
    let nested = script("nested.sh", &body);
    let dir = fresh("nested.data");
    let err = record(&dir, &nested);
    assert!(err.contains("the 3 processes it started recorded"), "{err}");
    let o = ok(&["report"], &dir);
    let (table, notes) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(leaf_calls(&table).iter().map(|s| s.1).collect::<Vec<_>>(), [2, 3, 4], "{table}");
    let subshell = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("child-") && !dir.join(n).join("meta.json").exists())
        .expect("the subshell's directory");
    let subshell_pid = subshell.strip_prefix("child-").unwrap();
    assert_eq!(table.matches(&format!("(started by pid {subshell_pid})")).count(), 2, "{table}");
    assert!(notes.contains(&format!("no trace of their own (pid {subshell_pid})")), "{notes}");
    let graph = text(&ok(&["replay"], &dir).stdout);
    assert_eq!(graph.matches("leaf();").count(), 2 + 3 + 4, "{graph}");
}

/// A traced program that starts a traced program (fork and exec, by
/// `system`): both are shown, the child with the pid that started it;
/// record's last line counts the child's trace next to the parent's.
#[test]
fn a_traced_program_starting_another() {
    let (mcount, patchable) = programs();
    let src = work_dir().join("starter.c");
    std::fs::write(
        &src,
        format!(
            r#"
#include <stdlib.h>
__attribute__((noinline)) int start(void) {{ return system("{p} 6 > /dev/null"); }}
int main(void) {{ return start(); }}
"#,
            p = patchable.display()
        ),
    )
    .unwrap();
    let starter = work_dir().join("starter");
    let out = Command::new("gcc")
        .args(["-O1", "-fpatchable-function-entry=5", "-o"])
        .arg(&starter)
        .arg(&src)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let _ = mcount;
    let dir = fresh("starter.data");
    let err = record(&dir, &starter);
    assert!(err.contains("1 child trace (8 calls"), "{err}");
    let table = text(&ok(&["report"], &dir).stdout);
    assert!(table.starts_with("# 2 processes"), "{table}");
    let sections = leaf_calls(&table);
    assert_eq!(sections.iter().map(|s| s.1).collect::<Vec<_>>(), [0, 6], "{table}");
    // `system` runs `sh -c`, which runs the program: its parent is the
    // shell, whose directory holds no trace.
    assert!(table.contains("started by pid"), "{table}");
    assert!(table.contains(&format!("[pid {}]: 1 thread(s), 2 call(s)", sections[0].0)), "{table}");
}

/// A script that runs two traced programs and then `exec`s a third: the
/// exec'd program records into the script's own directory, beside the
/// two children's, and all three are shown (the script's first image
/// recorded nothing; its directory held only the children's).
#[test]
fn a_script_ending_in_exec() {
    let (mcount, patchable) = programs();
    let body = format!("{m} 2\n{p} 3\nexec {m} 4\n", m = mcount.display(), p = patchable.display());
    let exec = script("exec.sh", &body);
    let dir = fresh("exec.data");
    record(&dir, &exec);
    assert!(dir.join("meta.json").exists(), "the exec'd program's trace is the top one");
    let table = text(&ok(&["report"], &dir).stdout);
    let mut calls: Vec<u64> = leaf_calls(&table).iter().map(|s| s.1).collect();
    calls.sort_unstable();
    assert_eq!(calls, [2, 3, 4], "{table}");
}
