//! The build script of `textpoke`. It does two things:
//!
//! 1. Builds the demo workload that `textpoke record` runs when it is given
//!    no program (demo/textpoke-demo.c, with -fpatchable-function-entry=5,
//!    =2 on aarch64).
//!    The binary is embedded in `textpoke` (see src/record.rs). Without a C
//!    compiler the build goes on with an empty demo, and `textpoke record`
//!    without a program says so.
//! 2. Tells the compiler where the agent (`libtextpoke_agent.so`) will be,
//!    so that `textpoke` carries it inside (see src/agent_file.rs).
//!
//! # Embedding the agent
//!
//! `textpoke-cli` depends on `textpoke-agent`, a cdylib: cargo builds
//! `libtextpoke_agent.so` into this build's `deps/` directory, and it does
//! so before it compiles the `textpoke` binary, which links against the
//! dependency and so waits for its compilation to finish (a binary is
//! never started on a dependency's metadata alone). This script runs
//! earlier than that, maybe before the agent exists, so it only computes
//! the path — `OUT_DIR` is `<profile dir>/build/textpoke-cli-<hash>/out`,
//! the agent is `<profile dir>/deps/libtextpoke_agent.so` — and hands it
//! to the compiler in `TEXTPOKE_EMBEDDED_AGENT`, where `include_bytes!`
//! reads it when the binary is compiled. No second build of the agent
//! (a nested `cargo build`, or a build-dependency, which cargo compiles
//! separately for the host) is needed: the workspace's build time is that
//! of the agent once.
//!
//! `cargo check`, `clippy`, `doc` and rust-analyzer compile the binary
//! without building the agent's cdylib; so that `include_bytes!` finds a
//! file there too, this script creates an empty one at that path when none
//! exists (with `O_EXCL`: an agent already linked is never touched, and
//! the agent's link, which writes its output anew, replaces the empty
//! file). An empty embedded agent means "none" to `textpoke`.
//!
//! If a future cargo lays its directories out otherwise, or the build is
//! told `TEXTPOKE_EMBED_AGENT=0` (a package that installs the agent in
//! `lib/textpoke/` beside `bin/` has no use for a second copy), the binary
//! is built without the agent inside and says so when it cannot find one.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    build_demo(&out_dir);
    let agent = agent_to_embed(&out_dir);
    println!("cargo:rustc-env=TEXTPOKE_EMBEDDED_AGENT={}", agent.display());
}

fn build_demo(out_dir: &Path) {
    let src = "demo/textpoke-demo.c";
    println!("cargo:rerun-if-changed={src}");
    let out = out_dir.join("textpoke-demo");
    let (cc, pad) = demo_compiler();
    let built = Command::new(&cc).args(["-O1", "-g", "-pthread", pad, "-o"]).arg(&out).arg(src).status();
    match built {
        Ok(s) if s.success() => {}
        other => {
            println!("cargo:warning=cannot build the textpoke record demo with {cc} ({other:?}); `textpoke record` will need a program");
            std::fs::write(&out, b"").expect("write OUT_DIR/textpoke-demo");
        }
    }
}

/// The C compiler for the target `textpoke` is built for, and the pad the
/// demo gets: five bytes on x86-64, two NOPs on aarch64 (the tracer's
/// entry sites there). A cross build takes `CC_<target>` or `TARGET_CC`
/// (the `cc` crate's names), else `<arch>-linux-gnu-gcc`; a native one
/// `CC`, else gcc.
fn demo_compiler() -> (String, &'static str) {
    let var = |k: &str| {
        println!("cargo:rerun-if-env-changed={k}");
        std::env::var(k).ok().filter(|v| !v.is_empty())
    };
    let target = std::env::var("TARGET").unwrap_or_default();
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let pad = if arch == "aarch64" { "-fpatchable-function-entry=2" } else { "-fpatchable-function-entry=5" };
    let cc = if std::env::var("HOST").ok().as_deref() == Some(target.as_str()) {
        var("CC").unwrap_or_else(|| "gcc".into())
    } else {
        var(&format!("CC_{}", target.replace('-', "_")))
            .or_else(|| var("TARGET_CC"))
            .unwrap_or_else(|| format!("{arch}-linux-gnu-gcc"))
    };
    (cc, pad)
}

/// The file `include_bytes!` embeds as the agent: the agent cargo builds
/// for this binary, or an empty file (no agent inside).
fn agent_to_embed(out_dir: &Path) -> PathBuf {
    println!("cargo:rerun-if-env-changed=TEXTPOKE_EMBED_AGENT");
    let none = out_dir.join("no-embedded-agent");
    std::fs::write(&none, b"").expect("write OUT_DIR/no-embedded-agent");
    if std::env::var_os("TEXTPOKE_EMBED_AGENT").is_some_and(|v| v == "0") {
        return none;
    }
    let Some(deps) = deps_dir(out_dir) else {
        println!(
            "cargo:warning=textpoke will not carry its agent: OUT_DIR {} is not <profile>/build/textpoke-cli-<hash>/out, \
             so the agent's place in deps/ is unknown; install lib/textpoke/libtextpoke_agent.so beside bin/ or set TEXTPOKE_AGENT",
            out_dir.display()
        );
        return none;
    };
    let agent = deps.join("libtextpoke_agent.so");
    // A placeholder for builds that check the binary without building the
    // agent (see the module docs). `create_new` is O_CREAT|O_EXCL.
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&agent) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            println!("cargo:warning=textpoke will not carry its agent: cannot reach {}: {e}", agent.display());
            return none;
        }
    }
    agent
}

/// `<profile dir>/deps` for `OUT_DIR` = `<profile dir>/build/<pkg>-<hash>/out`.
fn deps_dir(out_dir: &Path) -> Option<PathBuf> {
    let unit = out_dir.parent()?;
    let build = unit.parent()?;
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    let expected = name(out_dir)? == "out"
        && name(unit)?.starts_with(concat!(env!("CARGO_PKG_NAME"), "-"))
        && name(build)? == "build";
    expected.then(|| build.parent().map(|profile| profile.join("deps")))?
}
