//! `textpoke patch` where live patching is not built: the engine's
//! `textpoke::live` and the injector are x86-64 code, so on other
//! architectures (aarch64) the command refuses with a message saying so.

use std::process::ExitCode;

/// The arguments are taken as they come and not interpreted.
#[derive(clap::Args)]
pub struct Args {
    /// The process to patch, and the rest of the x86-64 command's arguments
    #[arg(value_name = "ARGS", trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

/// Refused here (exit 1).
pub fn run(_args: &Args) -> ExitCode {
    eprintln!(
        "textpoke patch: live patching is built for x86-64 only, and this textpoke is built for {}",
        std::env::consts::ARCH
    );
    ExitCode::from(1)
}
