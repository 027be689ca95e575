//! The `textpoke` binary, end to end.

use std::process::Command;

fn textpoke(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_textpoke")).args(args).output().unwrap()
}

#[test]
fn version() {
    let out = textpoke(&["--version"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("textpoke {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn selftest_reports_the_kernel_and_passes_both_strategies() {
    let out = textpoke(&["selftest", "--seconds", "0.3", "--threads", "4", "--sites", "100"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for line in ["membarrier SYNC_CORE", "MDWE refuse-exec-gain", "stress breakpoint", "stress stop-machine"] {
        assert!(stdout.contains(line), "missing {line:?} in\n{stdout}");
    }
    assert_eq!(stdout.lines().last(), Some("selftest: ok"));
    assert_eq!(stdout.matches(" ok: ").count(), 2, "{stdout}");
}

#[test]
fn bad_arguments_are_refused() {
    let out = textpoke(&["selftest", "--seconds", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be positive"));
    let out = textpoke(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Completion scripts for the usual shells, and a manual page per command,
/// made from the command-line definitions.
#[test]
fn completions_and_manual_pages() {
    for shell in ["bash", "zsh", "fish"] {
        let o = textpoke(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", String::from_utf8_lossy(&o.stderr));
        let script = String::from_utf8_lossy(&o.stdout);
        assert!(script.contains("textpoke") && script.contains("record") && script.contains("retval"), "{shell}");
    }
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("man-{}", std::process::id()));
    let o = textpoke(&["man", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for page in ["textpoke.1", "textpoke-record.1", "textpoke-report.1", "textpoke-dump.1"] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page} is a roff page");
    }
    let record = std::fs::read_to_string(dir.join("textpoke-record.1")).unwrap();
    assert!(record.contains("buffer\\-size") || record.contains("buffer-size"), "options documented");
    let _ = std::fs::remove_dir_all(dir);
}
