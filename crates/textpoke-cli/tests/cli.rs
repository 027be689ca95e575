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
