//! Small pieces shared by `record`, `ctl` and `list PROG`: an error with
//! the exit code it ends the command with, and a few system calls.

use std::ffi::CString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// A failure of a command: the message and the exit code (2 for input the
/// command refuses, 126 and 127 for a program that cannot be run or found,
/// as a shell reports them, 1 otherwise).
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn new(code: u8, message: impl Into<String>) -> CliError {
        CliError { code, message: message.into() }
    }

    /// Prints `PREFIX: MESSAGE` on stderr and returns the exit code.
    pub fn report(&self, prefix: &str) -> ExitCode {
        eprintln!("{prefix}: {}", self.message);
        ExitCode::from(self.code)
    }
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
