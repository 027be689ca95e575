//! The conventions of a command-line tool: shell completions and a manual
//! page made from the command-line definitions, `--color` and `NO_COLOR`
//! on every coloured output, no progress bar into a pipe.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

fn work_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("textpoke-conventions-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `textpoke ARGS` with its output piped, in an environment that says
/// nothing about colour but what `env` sets.
fn textpoke(args: &[&str], env: &[(&str, &str)]) -> Output {
    let sockets = work_dir().join("sockets");
    std::fs::create_dir_all(&sockets).unwrap();
    std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_textpoke"));
    c.args(args)
        .env("TEXTPOKE_SOCKET_DIR", &sockets)
        .env_remove("NO_COLOR")
        .env_remove("CLICOLOR_FORCE")
        .env("TERM", "xterm-256color")
        .current_dir(work_dir())
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(args: &[&str], env: &[(&str, &str)]) -> Output {
    let o = textpoke(args, env);
    assert!(o.status.success(), "textpoke {args:?}: {}", text(&o.stderr));
    o
}

/// Whether `b` holds an ANSI escape sequence (CSI).
fn has_escapes(b: &[u8]) -> bool {
    b.windows(2).any(|w| w == b"\x1b[")
}

/// The subcommands every generated document must name.
const SUBCOMMANDS: [&str; 8] = ["record", "ctl", "report", "replay", "dump", "list", "completions", "man"];

#[test]
fn completion_scripts_name_the_subcommands_and_options() {
    for shell in ["bash", "zsh", "fish"] {
        let script = text(&ok(&["completions", shell], &[]).stdout);
        assert!(script.contains("textpoke"), "{shell}");
        for sub in SUBCOMMANDS {
            assert!(script.contains(sub), "{shell}: no {sub}");
        }
        for option in ["--pid", "--color", "--flamegraph"] {
            assert!(script.contains(option) || script.contains(option.trim_start_matches('-')), "{shell}: {option}");
        }
    }
    // The function bash calls, and what fish and zsh define.
    assert!(text(&ok(&["completions", "bash"], &[]).stdout).contains("complete -F _textpoke"));
    assert!(text(&ok(&["completions", "fish"], &[]).stdout).contains("complete -c textpoke"));
    assert!(text(&ok(&["completions", "zsh"], &[]).stdout).starts_with("#compdef textpoke"));
    let o = textpoke(&["completions", "tcsh"], &[]);
    assert_eq!(o.status.code(), Some(2), "an unknown shell is a usage error");
}

#[test]
fn man_prints_a_roff_page_naming_the_subcommands() {
    let page = text(&ok(&["man"], &[]).stdout);
    assert!(page.contains(".TH textpoke 1"), "{page}");
    assert!(page.contains(".SH NAME") && page.contains(".SH SUBCOMMANDS"), "{page}");
    for sub in SUBCOMMANDS {
        assert!(page.contains(&format!("textpoke\\-{sub}(1)")), "no {sub} in {page}");
    }
    assert!(!has_escapes(page.as_bytes()), "roff, not terminal colours");
    // And --help says where it is.
    let help = text(&ok(&["--help"], &[]).stdout);
    assert!(help.contains("textpoke man | man -l -") && help.contains("textpoke completions"), "{help}");
}

/// A small traced C program's trace, recorded once.
fn trace() -> &'static PathBuf {
    static T: OnceLock<PathBuf> = OnceLock::new();
    T.get_or_init(|| {
        let dir = work_dir();
        let src = dir.join("hot.c");
        std::fs::write(
            &src,
            r#"
#include <time.h>
static volatile int sink;
__attribute__((noinline)) void slow(void) { struct timespec t = {0, 2000000}; nanosleep(&t, 0); }
__attribute__((noinline)) void quick(void) { sink++; }
int main(void) { slow(); for (int i = 0; i < 3; i++) quick(); return 0; }
"#,
        )
        .unwrap();
        let exe = dir.join("hot");
        let out = Command::new("gcc")
            .args(["-O1", "-fpatchable-function-entry=5", "-o"])
            .arg(&exe)
            .arg(&src)
            .output()
            .expect("gcc must be installed to build the test programs");
        assert!(out.status.success(), "{}", text(&out.stderr));
        let data = dir.join("hot.data");
        let _ = std::fs::remove_dir_all(&data);
        ok(&["record", "-o", data.to_str().unwrap(), "--", exe.to_str().unwrap()], &[]);
        data
    })
}

#[test]
fn color_follows_the_flag_then_no_color_then_the_terminal() {
    let dir = trace().to_str().unwrap();
    for cmd in ["report", "replay"] {
        // Piped, nothing asked: plain.
        let o = ok(&[cmd, "-i", dir], &[]);
        assert!(!has_escapes(&o.stdout) && !has_escapes(&o.stderr), "{cmd}: {}", text(&o.stdout));
        // Asked for: coloured even into a pipe, even with NO_COLOR (the
        // flag is the user's latest word).
        for env in [&[][..], &[("NO_COLOR", "1")][..]] {
            let o = ok(&[cmd, "--color=always", "-i", dir], env);
            assert!(has_escapes(&o.stdout), "{cmd} {env:?}: {}", text(&o.stdout));
        }
        // The same text once the escape sequences are taken out.
        let plain = text(&ok(&[cmd, "-i", dir], &[]).stdout);
        let coloured = text(&ok(&[cmd, "--color", "always", "-i", dir], &[]).stdout);
        assert_eq!(strip(&coloured), plain, "{cmd}");
        // Refused: never, whatever forces it.
        for (args, env) in [
            (&["--color=never"][..], &[("CLICOLOR_FORCE", "1")][..]),
            (&[][..], &[("NO_COLOR", "1"), ("CLICOLOR_FORCE", "1")][..]),
        ] {
            let mut all = vec![cmd, "-i", dir];
            all.extend_from_slice(args);
            let o = ok(&all, env);
            assert!(!has_escapes(&o.stdout) && !has_escapes(&o.stderr), "{all:?} {env:?}");
        }
        // CLICOLOR_FORCE colours a pipe in auto.
        assert!(has_escapes(&ok(&[cmd, "-i", dir], &[("CLICOLOR_FORCE", "1")]).stdout), "{cmd}");
    }
    // The 2 ms call stands out in the report.
    let report = text(&ok(&["report", "--color=always", "-i", dir], &[]).stdout);
    let slow = report.lines().find(|l| l.ends_with(" slow")).unwrap();
    assert!(slow.contains("\x1b[33m"), "{slow:?}");
    let quick = report.lines().find(|l| l.ends_with(" quick")).unwrap();
    assert!(!has_escapes(quick.as_bytes()), "{quick:?}");
}

#[test]
fn messages_and_help_follow_color_too() {
    let missing = work_dir().join("no-such.data");
    let missing = missing.to_str().unwrap();
    for cmd in ["report", "replay", "dump"] {
        let mut args = vec![cmd, "-i", missing];
        if cmd == "dump" {
            args.push("--folded");
        }
        let o = textpoke(&args, &[]);
        assert!(!o.status.success());
        assert!(!has_escapes(&o.stderr), "{}", text(&o.stderr));
        assert!(text(&o.stderr).starts_with(&format!("textpoke {cmd}: trace directory")), "{}", text(&o.stderr));
        args.push("--color=always");
        let o = textpoke(&args, &[]);
        assert!(
            text(&o.stderr).starts_with(&format!("\x1b[31mtextpoke {cmd}:\x1b[0m trace directory")),
            "{}",
            text(&o.stderr)
        );
    }
    assert!(has_escapes(&ok(&["--color=always", "--help"], &[]).stdout));
    assert!(!has_escapes(&ok(&["--color=never", "--help"], &[("CLICOLOR_FORCE", "1")]).stdout));
    assert!(!has_escapes(&ok(&["report", "--help"], &[]).stdout));
    let o = textpoke(&["--color=sometimes", "report"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("always"), "the choices are listed: {}", text(&o.stderr));
}

#[test]
fn no_progress_bar_into_a_pipe() {
    let dir = trace().to_str().unwrap();
    for args in [&["report"][..], &["dump", "--flamegraph"][..], &["replay"][..]] {
        let mut all = args.to_vec();
        all.extend(["-i", dir]);
        let o = ok(&all, &[]);
        assert!(o.stderr.is_empty(), "{all:?}: {}", text(&o.stderr));
    }
}

/// `s` without its SGR escape sequences.
fn strip(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("\x1b[") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after.find('m').expect("an SGR sequence ends with m");
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}
