//! Builds the demo workload that `textpoke record` runs when it is given
//! no program (demo/textpoke-demo.c, with -fpatchable-function-entry=5).
//! The binary is embedded in `textpoke` (see src/record.rs). Without a C
//! compiler the build goes on with an empty demo, and `textpoke record`
//! without a program says so.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "demo/textpoke-demo.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CC");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("textpoke-demo");
    let cc = std::env::var("CC").unwrap_or_else(|_| "gcc".into());
    let built = Command::new(&cc)
        .args(["-O1", "-g", "-pthread", "-fpatchable-function-entry=5", "-o"])
        .arg(&out)
        .arg(src)
        .status();
    match built {
        Ok(s) if s.success() => {}
        other => {
            println!("cargo:warning=cannot build the textpoke record demo with {cc} ({other:?}); `textpoke record` will need a program");
            std::fs::write(&out, b"").expect("write OUT_DIR/textpoke-demo");
        }
    }
}
