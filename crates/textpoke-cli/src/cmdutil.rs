//! Small pieces shared by the commands: an error with the exit code it
//! ends the command with, printing a message safely, whether to colour,
//! and a few system calls.

use std::ffi::{CString, OsString};
use std::io::IsTerminal;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;
use textpoke_analysis::color::{Colors, Style};
use textpoke_analysis::escape;

/// When to colour (`--color`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ColorChoice {
    /// When the output is a terminal, `NO_COLOR` is not set and `TERM` is
    /// not `dumb` (`CLICOLOR_FORCE` colours pipes too)
    #[default]
    Auto,
    /// Always, even into pipes and files (and whatever `NO_COLOR` says)
    Always,
    /// Never
    Never,
}

impl ColorChoice {
    /// Whether to colour an output that is a terminal or not, given the
    /// environment `var` reads. An explicit `--color` wins; in `auto`,
    /// `NO_COLOR` (set and not empty: no-color.org) turns colour off,
    /// `CLICOLOR_FORCE` (set, not empty, not `0`) on even into pipes.
    pub fn decide(self, terminal: bool, var: impl Fn(&str) -> Option<OsString>) -> bool {
        let set = |name: &str| var(name).is_some_and(|v| !v.is_empty());
        match self {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto if set("NO_COLOR") => false,
            ColorChoice::Auto if set("CLICOLOR_FORCE") && var("CLICOLOR_FORCE").is_some_and(|v| v != "0") => true,
            ColorChoice::Auto => terminal && var("TERM").is_none_or(|t| t != "dumb"),
        }
    }

    /// The choice `--color` gives on this command line (before clap parses
    /// it, so that clap's own messages follow it too): the last one before
    /// `--`, `auto` when there is none or it is not understood (clap then
    /// says so).
    pub fn from_args(args: &[OsString]) -> ColorChoice {
        let mut choice = ColorChoice::Auto;
        let mut it = args.iter().skip(1);
        while let Some(a) = it.next() {
            let value = match a.to_str() {
                Some("--") => break,
                Some("--color") => it.next().and_then(|v| v.to_str()),
                Some(a) => a.strip_prefix("--color="),
                None => None,
            };
            choice = match value {
                Some("always") => ColorChoice::Always,
                Some("never") => ColorChoice::Never,
                Some("auto") => ColorChoice::Auto,
                _ => choice,
            };
        }
        choice
    }
}

/// Whether standard output and standard error are coloured, set once at
/// the start ([`set_colors`]).
static COLORS: OnceLock<(Colors, Colors)> = OnceLock::new();

/// Decides, once, whether standard output and standard error are
/// coloured.
pub fn set_colors(choice: ColorChoice) {
    let var = |n: &str| std::env::var_os(n);
    let out = choice.decide(std::io::stdout().is_terminal(), var);
    let err = choice.decide(std::io::stderr().is_terminal(), var);
    let _ = COLORS.set((Colors { on: out }, Colors { on: err }));
}

/// The colours of standard output (none until [`set_colors`]).
pub fn stdout_colors() -> Colors {
    COLORS.get().map_or(Colors::OFF, |c| c.0)
}

/// The colours of standard error (none until [`set_colors`]).
pub fn stderr_colors() -> Colors {
    COLORS.get().map_or(Colors::OFF, |c| c.1)
}

/// Prints `PREFIX: MESSAGE` on stderr, the prefix in `style` (see
/// [`eprint_line`] for the message).
pub fn eprint_prefixed(prefix: &str, style: Style, message: &str) {
    eprintln!("{} {}", stderr_colors().paint(style, &format!("{prefix}:")), escape(message));
}

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

    /// Prints `PREFIX: MESSAGE` (see [`eprint_line`]; the prefix in red
    /// when stderr is coloured) and the help on stderr, and returns the
    /// exit code.
    pub fn report(&self, prefix: &str) -> ExitCode {
        eprint_prefixed(prefix, Style::Red, &self.message);
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

/// `--duration`: seconds, fractions allowed.
pub(crate) fn parse_secs(s: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !secs.is_finite() || secs <= 0.0 || secs > 1e9 {
        return Err(format!("{s} is not a positive number of seconds"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// The environment variables of process `pid` (empty if unreadable), for
/// `record -p` and `patch`, which look for the agent's settings there.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // record -p and patch: x86-64 only
pub(crate) fn environ(pid: i32) -> Vec<(Vec<u8>, Vec<u8>)> {
    let bytes = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    bytes
        .split(|&b| b == 0)
        .filter_map(|kv| {
            let i = kv.iter().position(|&b| b == b'=')?;
            Some((kv[..i].to_vec(), kv[i + 1..].to_vec()))
        })
        .collect()
}

/// The value of `key` in an [`environ`] list.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn lookup(env: &[(Vec<u8>, Vec<u8>)], key: &str) -> Option<OsString> {
    env.iter().find(|(k, _)| k == key.as_bytes()).map(|(_, v)| OsString::from_vec(v.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |n| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| OsString::from(v))
    }

    #[test]
    fn color_choice_follows_the_flag_then_no_color_then_the_terminal() {
        use ColorChoice::*;
        assert!(Auto.decide(true, env(&[])));
        assert!(!Auto.decide(false, env(&[])));
        assert!(!Auto.decide(true, env(&[("NO_COLOR", "1")])));
        assert!(Auto.decide(true, env(&[("NO_COLOR", "")])), "an empty NO_COLOR is not set");
        assert!(!Auto.decide(true, env(&[("TERM", "dumb")])));
        assert!(Auto.decide(false, env(&[("CLICOLOR_FORCE", "1")])));
        assert!(!Auto.decide(false, env(&[("CLICOLOR_FORCE", "0")])));
        assert!(!Auto.decide(false, env(&[("CLICOLOR_FORCE", "1"), ("NO_COLOR", "1")])));
        assert!(Always.decide(false, env(&[("NO_COLOR", "1")])));
        assert!(!Never.decide(true, env(&[("CLICOLOR_FORCE", "1")])));
    }

    #[test]
    fn color_choice_is_found_before_clap_parses() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(ColorChoice::from_args(&args(&["tp", "report", "--color=always"])), ColorChoice::Always);
        assert_eq!(ColorChoice::from_args(&args(&["tp", "--color", "never", "report"])), ColorChoice::Never);
        assert_eq!(ColorChoice::from_args(&args(&["tp", "--color=never", "--color=always"])), ColorChoice::Always);
        assert_eq!(ColorChoice::from_args(&args(&["tp", "record", "--", "prog", "--color=never"])), ColorChoice::Auto);
        assert_eq!(ColorChoice::from_args(&args(&["tp", "--color=purple"])), ColorChoice::Auto);
    }
}
