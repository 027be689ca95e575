//! `textpoke record -p PID` where the agent cannot be injected: the
//! injector (`textpoke_inject`) stops a thread of the target with ptrace
//! and runs x86-64 code in it, so on other architectures (aarch64) `-p`
//! refuses with a message saying so, and what works instead. Everything
//! else of `textpoke record` (starting a program with the agent
//! preloaded) works there.

use crate::cmdutil::CliError;
use crate::record::Args;
use std::process::ExitCode;

pub(crate) use crate::cmdutil::parse_secs;

/// `textpoke record -p PID`: refused here (exit 1).
pub(crate) fn record_pid(_args: &Args, pid: i32) -> Result<ExitCode, CliError> {
    Err(CliError::new(
        1,
        format!(
            "cannot attach to process {pid}: attaching (-p) injects the agent with x86-64 code, and this textpoke is built \
             for {}; start the program under `textpoke record -- PROGRAM` instead",
            std::env::consts::ARCH
        ),
    ))
}
