//! Names from the traced program that hold terminal controls (`ESC [2J`,
//! BEL, CR, LF, C1 controls, bidi overrides, invalid UTF-8) never reach
//! the reader's terminal raw: every text output shows them escaped
//! (`textpoke_analysis::escape`), no line is forged, and the JSON outputs
//! keep the exact names.
//!
//! Two sources of such names: a trace this test process records with
//! `textpoke_record` under names it registers, and a C program compiled
//! here whose symbol table is patched to hold them, recorded through
//! `textpoke record`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use textpoke_record::{self as record, RecorderConfig};

/// Controls, a C1 CSI, a right-to-left override and a backslash.
const EVIL: &str = "evil\x1b[2J\x07\r\nforged\u{9b}31m\u{202e}RLO\\end";
/// How every text output shows [`EVIL`].
const EVIL_SHOWN: &str = "evil\\e[2J\\x07\\r\\nforged\\u{9b}31m\\u{202e}RLO\\\\end";
/// A frame separator of folded stacks and a newline.
const SEMI: &str = "semi;colon\nsecond line";
const PROCESS: &str = "proc\x1b]0;owned\x07";

fn tmpdir(name: &str) -> PathBuf {
    let d =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hostile-names").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn textpoke() -> Command {
    Command::new(env!("CARGO_BIN_EXE_textpoke"))
}

fn run(args: &[&str]) -> Output {
    textpoke().args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a command that must succeed and returns its stdout, after
/// checking that neither stdout nor stderr holds a raw control.
fn ok(args: &[&str]) -> String {
    let o = run(args);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "textpoke {args:?}: {err:?}");
    assert_clean(&format!("stdout of {args:?}"), &out);
    assert_clean(&format!("stderr of {args:?}"), &err);
    out
}

/// A character a terminal acts on, or that does not show.
fn is_raw(c: char) -> bool {
    (c.is_control() && c != '\n')
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn assert_clean(what: &str, text: &str) {
    let raw: Vec<char> = text.chars().filter(|&c| is_raw(c)).collect();
    assert!(raw.is_empty(), "{what} holds raw {raw:?}:\n{text:?}");
    // LF and CR inside a name would start lines of their own.
    for l in text.lines() {
        assert!(!l.starts_with("forged") && !l.starts_with("second line"), "{what}: a forged line {l:?}");
    }
}

/// Records a trace whose process and functions have hostile names:
/// `plain_root { EVIL { SEMI {} } }`, three times.
fn hostile_trace() -> PathBuf {
    let dir = tmpdir("trace");
    let root = record::register_function(0x9000, "plain_root");
    let evil = record::register_function(0x9100, EVIL);
    let semi = record::register_function(0x9200, SEMI);
    let cfg = RecorderConfig { process_name: Some(PROCESS.into()), ..RecorderConfig::new(&dir) };
    let rec = record::start(cfg).unwrap();
    for _ in 0..3 {
        assert!(record::entry(root, 0) && record::entry(evil, 1) && record::entry(semi, 2));
        assert!(record::exit(semi, 2) && record::exit(evil, 1) && record::exit(root, 0));
    }
    rec.stop().unwrap();
    dir
}

#[test]
fn text_outputs_escape_names_and_json_keeps_them() {
    let dir = hostile_trace();
    let d = dir.to_str().unwrap();

    let table = ok(&["report", "-i", d]);
    assert!(table.lines().any(|l| l.ends_with(&format!("  {EVIL_SHOWN}"))), "{table}");
    assert!(table.contains("semi;colon\\nsecond line"), "{table}");
    assert!(table.contains("# process proc\\e]0;owned\\x07 [pid"), "{table}");

    let csv = ok(&["report", "-i", d, "--format", "csv"]);
    assert!(csv.lines().any(|l| l.starts_with(&format!("{EVIL_SHOWN},3,"))), "{csv}");
    assert_eq!(csv.lines().count(), 4, "a header and 3 functions, one line each: {csv}");

    let json: serde_json::Value = serde_json::from_str(&ok(&["report", "-i", d, "--format", "json"])).unwrap();
    let names: Vec<&str> =
        json["processes"][0]["functions"].as_array().unwrap().iter().map(|f| f["function"].as_str().unwrap()).collect();
    assert!(names.contains(&EVIL) && names.contains(&SEMI), "JSON has the exact names: {names:?}");

    let replay = ok(&["replay", "-i", d]);
    assert!(replay.contains(&format!("|   {EVIL_SHOWN}() {{")), "{replay}");
    assert!(replay.contains(&format!("}} /* {EVIL_SHOWN} */")), "{replay}");
    assert!(replay.contains("|     semi;colon\\nsecond line();"), "{replay}");
    assert!(replay.contains("# process proc\\e]0;owned\\x07 [pid"), "{replay}");

    let list = ok(&["list", "-i", d]);
    assert!(list.lines().any(|l| l == format!("0x000000009100  {EVIL_SHOWN}")), "{list}");

    // Folded stacks: one line per path, `;` only between frames.
    let folded = ok(&["dump", "--folded", "-i", d]);
    let mut lines: Vec<&str> = folded.lines().map(|l| l.rsplit_once(' ').unwrap().0).collect();
    lines.sort();
    let evil_path = format!("plain_root;{EVIL_SHOWN}");
    assert_eq!(lines, ["plain_root", evil_path.as_str(), &format!("{evil_path};semi:colon\\nsecond line")], "{folded}");

    let svg = ok(&["dump", "--flamegraph", "-i", d]);
    assert!(svg.contains("evil\\e[2J\\x07\\r\\nforged"), "the SVG shows the escaped name");
    assert!(svg.contains("proc\\e]0;owned\\x07"), "and the escaped process name in its title");

    // Chrome JSON: the exact names, the controls in JSON escapes.
    let chrome = ok(&["dump", "--chrome", "-i", d]);
    let v: serde_json::Value = serde_json::from_str(&chrome).unwrap();
    let events = v["traceEvents"].as_array().unwrap();
    assert_eq!(events.iter().filter(|e| e["ph"] == "X" && e["name"] == EVIL).count(), 3);
    assert_eq!(events.iter().filter(|e| e["ph"] == "X" && e["name"] == SEMI).count(), 3);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn error_messages_escape_the_paths_they_quote() {
    let base = tmpdir("errors");
    let missing = base.join("no\x1b[2Jsuch\ndir");
    let o = textpoke().arg("report").arg("-i").arg(&missing).output().unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_clean("report's error", &err);
    assert!(err.contains("no\\e[2Jsuch\\ndir"), "{err}");
    let o = textpoke().arg("list").arg(base.join("prog\x07\r")).output().unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_clean("list's error", &err);
    assert!(err.contains("prog\\x07\\r"), "{err}");
    let _ = std::fs::remove_dir_all(base);
}

// ---------------------------------------------------------------------------
// A C program with such names in its symbol table.

/// The symbol `evil` is compiled under this name, then patched in the
/// executable to [`ELF_EVIL`] (same length): gcc and as cannot spell such
/// a name.
const PLACEHOLDER: &[u8] = b"evil_XXXXXXXXXXXXXXXXXXXXXXXX";
/// Controls, a C1 CSI (UTF-8), a right-to-left override and an invalid
/// UTF-8 byte.
const ELF_EVIL: &[u8] = b"evil\x1b[2J\x07\r\nforged\xc2\x9b31m\xe2\x80\xaeRLO\xff";
/// How text outputs show [`ELF_EVIL`] (the invalid byte decoded as U+FFFD).
const ELF_EVIL_SHOWN: &str = "evil\\e[2J\\x07\\r\\nforged\\u{9b}31m\\u{202e}RLO\u{fffd}";

const PROG: &str = r#"
#include <stdio.h>
#include <sys/prctl.h>
__attribute__((noinline)) int evil(int x) __asm__("evil_XXXXXXXXXXXXXXXXXXXXXXXX");
__attribute__((noinline)) int evil(int x) { return x + 1; }
__attribute__((noinline)) int plain_caller(int n) { int s = 0; for (int i = 0; i < n; i++) s += evil(i); return s; }
int main(void) {
    prctl(PR_SET_NAME, "p\x1b[2Jcomm", 0, 0, 0);
    printf("%d\n", plain_caller(5));
    return 0;
}
"#;

/// The program, built with patchable entries, its `evil` renamed.
fn hostile_program(dir: &Path) -> PathBuf {
    assert_eq!(PLACEHOLDER.len(), ELF_EVIL.len());
    let c = dir.join("prog.c");
    let exe = dir.join("prog");
    std::fs::write(&c, PROG).unwrap();
    let o = Command::new("gcc")
        .args(["-O1", "-fpatchable-function-entry=5", "-o"])
        .arg(&exe)
        .arg(&c)
        .output()
        .expect("gcc must be installed to build the test programs");
    assert!(o.status.success(), "gcc: {}", text(&o.stderr));
    let mut bytes = std::fs::read(&exe).unwrap();
    let mut patched = 0;
    while let Some(at) = bytes.windows(PLACEHOLDER.len()).position(|w| w == PLACEHOLDER) {
        bytes[at..at + ELF_EVIL.len()].copy_from_slice(ELF_EVIL);
        patched += 1;
    }
    assert!(patched >= 1, "the placeholder is in the symbol table");
    std::fs::write(&exe, bytes).unwrap();
    exe
}

#[test]
fn a_programs_symbol_names_are_escaped_from_elf_to_report() {
    let dir = tmpdir("program");
    let exe = hostile_program(&dir);
    let e = exe.to_str().unwrap();

    let list = ok(&["list", e]);
    assert!(list.lines().any(|l| l.ends_with(&format!("  {ELF_EVIL_SHOWN}"))), "{list}");

    // A glob that matches nothing is refused with the close names: escaped.
    let sockets = dir.join("sockets");
    std::fs::create_dir(&sockets).unwrap();
    std::fs::set_permissions(&sockets, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let record = |args: &[&str]| {
        textpoke().arg("record").args(args).env("TEXTPOKE_SOCKET_DIR", &sockets).current_dir(&dir).output().unwrap()
    };
    let o = record(&["-F", "evilX*", "--", e]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_clean("the refusal", &err);
    assert!(err.contains(&format!("did you mean: {ELF_EVIL_SHOWN}")), "{err}");

    let o = record(&["-o", "trace.data", "--", e]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "15\n");
    assert_clean("record's summary", &text(&o.stderr));
    let t = dir.join("trace.data");
    let t = t.to_str().unwrap();
    let report = ok(&["report", "-i", t]);
    assert!(report.lines().any(|l| l.ends_with(&format!("  {ELF_EVIL_SHOWN}"))), "{report}");
    let replay = ok(&["replay", "-i", t]);
    // Five leaf calls (with their return value, when the recorder keeps it).
    assert_eq!(replay.matches(&format!("|     {ELF_EVIL_SHOWN}()")).count(), 5, "{replay}");
    // The name the program gave itself (prctl) is escaped too.
    assert!(report.contains("# process p\\e[2Jcomm [pid"), "{report}");
    let list = ok(&["list", "-i", t]);
    assert!(list.contains(ELF_EVIL_SHOWN), "{list}");
    let folded = ok(&["dump", "--folded", "-i", t]);
    assert!(folded.contains(&format!("plain_caller;{ELF_EVIL_SHOWN} ")), "{folded}");
    ok(&["dump", "--flamegraph", "-i", t]);
    let _ = std::fs::remove_dir_all(dir);
}
