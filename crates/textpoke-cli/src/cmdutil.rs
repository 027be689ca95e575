//! Small pieces shared by the commands: an error with the exit code it
//! ends the command with, printing a message safely, and a few system
//! calls.

use std::ffi::CString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use textpoke_analysis::escape;

/// A failure of a command: the message and the exit code (2 for input the
/// command refuses, 126 and 127 for a program that cannot be run or found,
/// as a shell reports them, 1 otherwise).
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    /// One line; may quote names and paths from outside.
    pub message: String,
    /// Fixed advice printed as it is after the message (may span lines).
    pub help: &'static str,
}

impl CliError {
    pub fn new(code: u8, message: impl Into<String>) -> CliError {
        CliError { code, message: message.into(), help: "" }
    }

    /// The same error followed by the fixed text `help`.
    pub fn with_help(self, help: &'static str) -> CliError {
        CliError { help, ..self }
    }

    /// Prints `PREFIX: MESSAGE` (see [`eprint_line`]) and the help on
    /// stderr, and returns the exit code.
    pub fn report(&self, prefix: &str) -> ExitCode {
        eprint_line(&format!("{prefix}: {}", self.message));
        if !self.help.is_empty() {
            eprintln!("{}", self.help);
        }
        ExitCode::from(self.code)
    }
}

/// Prints one line of text on stderr with its control and invisible
/// characters escaped ([`escape`]): messages quote paths, function names
/// and process names that come from outside, which must not act on the
/// reader's terminal nor start lines of their own.
pub fn eprint_line(line: &str) {
    eprintln!("{}", escape(line));
}

/// Whether this process may execute `path` (`access(X_OK)`).
pub fn access_x(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: a valid C string.
    unsafe { libc::access(c.as_ptr(), libc::X_OK) == 0 }
}

/// A new directory `TMPDIR/NAME-XXXXXX`, mode 0700 (`mkdtemp`).
pub fn private_temp_dir(name: &str) -> std::io::Result<PathBuf> {
    let template = std::env::temp_dir().join(format!("{name}-XXXXXX"));
    let mut bytes = template.into_os_string().into_vec();
    bytes.push(0);
    // SAFETY: a writable NUL-terminated template ending in XXXXXX.
    let p = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    bytes.pop();
    Ok(PathBuf::from(std::ffi::OsString::from_vec(bytes)))
}
