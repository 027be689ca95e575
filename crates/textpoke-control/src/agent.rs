//! What `textpoke record` tells the agent: the settings of a recording,
//! one type ([`AgentConfig`]) for both ends, in two forms.
//!
//! # Two forms
//!
//! - **The environment.** A program started under `textpoke record` gets
//!   the agent preloaded and the settings as variables
//!   ([`AgentConfig::apply_to`] on the CLI's side, [`AgentConfig::from_env`]
//!   in the agent's constructor). The variables are inherited by the
//!   programs the traced one starts, which is how their agents find the
//!   same trace directory.
//! - **A message.** An agent injected into a running process (issue #11,
//!   `textpoke record -p PID`) must not read settings from the program's
//!   environment, which is the program's own, nor change it (`setenv` in a
//!   running multithreaded program races its `getenv`). The same settings
//!   travel as a text message over a socket instead
//!   ([`AgentConfig::to_message`], [`AgentConfig::from_message`],
//!   [`AgentConfig::read_message`]).
//!
//! # The variables
//!
//! | variable | field | meaning |
//! |---|---|---|
//! | `TEXTPOKE_DIR` ([`DIR_ENV`]) | `dir` | the trace directory (default [`DEFAULT_DIR`], relative to the working directory at load) |
//! | `TEXTPOKE_PID` ([`PID_ENV`]) | `owner_pid` | the process that writes `dir` itself; any other process writes `dir/child-<pid>/`. Unset: the process that loads the agent (which then sets it, so that the programs it starts write their own directories) |
//! | `TEXTPOKE_INCLUDE` ([`INCLUDE_ENV`]) | `include` | include globs (`-F`), one per line; none: every function |
//! | `TEXTPOKE_EXCLUDE` ([`EXCLUDE_ENV`]) | `exclude` | exclude globs (`-N`), one per line |
//! | `TEXTPOKE_COUNT_ONLY` ([`COUNT_ONLY_ENV`]) | `count_only` | `1`: count calls per function instead of recording entries and exits |
//! | `TEXTPOKE_NO_LIBCALL` ([`NO_LIBCALL_ENV`]) | `no_libcall` | `1`: do not trace library calls through the PLT (`--no-libcall`) |
//! | `TEXTPOKE_RETVAL` ([`RETVAL_ENV`]) | `retval` | globs (`-R`), one per line: record the return values of these functions |
//! | `TEXTPOKE_BUFFER_SIZE` ([`BUFFER_SIZE_ENV`]) | `buffer_size` | the most one thread's buffer may hold, bytes (`-b`) |
//! | `TEXTPOKE_MEMORY_LIMIT` ([`MEMORY_LIMIT_ENV`]) | `memory_limit` | the most all buffers may hold together, bytes (`--memory-limit`) |
//! | `TEXTPOKE_CLOCK` ([`CLOCK_ENV`]) | `clock` | `tsc`, `tsc-unordered` or `monotonic` (`--clock`); unset: the best this machine has |
//! | `TEXTPOKE_SOCKET_DIR` ([`SOCKET_DIR_ENV`]) | `socket_dir` | where the control socket goes (see [`socket_dir`](crate::socket_dir)) |
//! | `TEXTPOKE_RECORD_PID` ([`FRONT_ENV`]) | `front` | `PID:START`: the `textpoke record` process this run belongs to (see [`FrontProcess`]). Unset: no such process to watch (the agent preloaded by hand) |
//!
//! A value the agent cannot use is reported ([`ConfigWarning`]) and the
//! default taken: a size that is not a number, an unknown clock, a front
//! process that is not `PID:START`. A `TEXTPOKE_PID` that is not a pid, or
//! a list that is not UTF-8, is taken as unset.
//!
//! # The message
//!
//! A first line `textpoke-agent-config 1` (the version), then one `KEY
//! VALUE` line per setting (`KEY` alone for a flag), in any order, then an
//! empty line:
//!
//! ```text
//! textpoke-agent-config 1
//! dir /home/me/textpoke.data
//! owner-pid 4242
//! include work*
//! include main
//! count-only
//! buffer-size 67108864
//! clock tsc
//! front 4200:98765
//!
//! ```
//!
//! An injected agent's first message may instead be the two lines
//! `textpoke-patch-session 1` and an empty one ([`PATCH_SESSION`]):
//! `textpoke patch` asks for a session that records nothing (no recorder,
//! no control socket, no signal handler of its own), whose requests are
//! the `patch-*` lines of the control protocol ([`SessionStart`]).
//!
//! Keys: `dir`, `owner-pid`, `include`, `exclude` and `retval` (one line
//! per glob, repeatable), `count-only`, `buffer-size`, `memory-limit`,
//! `clock`, `socket-dir`, `front`; a setting left out is unset. Values
//! are escaped so that any path fits on one line: `\\` is a backslash,
//! `\xHH` a byte (every control character and every byte that is not part
//! of valid UTF-8 is written so). Both ends are the same build of
//! textpoke, so the parser is strict: an unknown key, a repeated
//! setting, a bad value or another version is an error naming the line.

use crate::{shorten, ControlError, FrontProcess, FRONT_ENV, SOCKET_DIR_ENV};
use std::ffi::OsString;
use std::io::BufRead;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

/// The trace directory ([`AgentConfig::dir`]).
pub const DIR_ENV: &str = "TEXTPOKE_DIR";
/// The process that writes the trace directory itself ([`AgentConfig::owner_pid`]).
pub const PID_ENV: &str = "TEXTPOKE_PID";
/// Include globs, one per line ([`AgentConfig::include`]).
pub const INCLUDE_ENV: &str = "TEXTPOKE_INCLUDE";
/// Exclude globs, one per line ([`AgentConfig::exclude`]).
pub const EXCLUDE_ENV: &str = "TEXTPOKE_EXCLUDE";
/// `1`: count calls only ([`AgentConfig::count_only`]).
pub const COUNT_ONLY_ENV: &str = "TEXTPOKE_COUNT_ONLY";
/// `1`: library calls are not traced ([`AgentConfig::no_libcall`]).
pub const NO_LIBCALL_ENV: &str = "TEXTPOKE_NO_LIBCALL";
/// Globs of functions whose return values are recorded ([`AgentConfig::retval`]).
pub const RETVAL_ENV: &str = "TEXTPOKE_RETVAL";
/// One thread's buffer limit, bytes ([`AgentConfig::buffer_size`]).
pub const BUFFER_SIZE_ENV: &str = "TEXTPOKE_BUFFER_SIZE";
/// All buffers' limit, bytes ([`AgentConfig::memory_limit`]).
pub const MEMORY_LIMIT_ENV: &str = "TEXTPOKE_MEMORY_LIMIT";
/// The timestamp clock ([`AgentConfig::clock`]).
pub const CLOCK_ENV: &str = "TEXTPOKE_CLOCK";

/// The trace directory when [`AgentConfig::dir`] is unset.
pub const DEFAULT_DIR: &str = "textpoke.data";

/// The first line of a message, before the version.
const MESSAGE_HEADER: &str = "textpoke-agent-config";
/// The message format's version.
const MESSAGE_VERSION: u32 = 1;
/// The longest message [`AgentConfig::read_message`] reads, in bytes.
pub const MAX_MESSAGE: usize = 1 << 20;

/// The first message of a live-patching session (see the module docs).
pub const PATCH_SESSION: &str = "textpoke-patch-session 1\n\n";

/// What the first message of an injected agent's session asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionStart {
    /// `textpoke record -p`: record with these settings.
    Record(AgentConfig),
    /// `textpoke patch`: serve `patch-*` requests, record nothing.
    Patch,
}

impl SessionStart {
    /// Reads a session's first message: [`PATCH_SESSION`] or an
    /// [`AgentConfig`] message, at most [`MAX_MESSAGE`] bytes.
    pub fn read(r: &mut impl BufRead) -> Result<SessionStart, ControlError> {
        let text = read_until_empty_line(r)?;
        if text == PATCH_SESSION {
            return Ok(SessionStart::Patch);
        }
        AgentConfig::from_message(&text).map(SessionStart::Record)
    }
}

/// Reads lines up to and with an empty one, at most [`MAX_MESSAGE`] bytes.
fn read_until_empty_line(r: &mut impl BufRead) -> Result<String, ControlError> {
    let mut text = String::new();
    loop {
        let start = text.len();
        // At most one byte past the limit: enough to tell it was passed.
        let n = std::io::Read::take(&mut *r, (MAX_MESSAGE + 1 - start) as u64)
            .read_line(&mut text)
            .map_err(|e| bad_message(format!("reading it: {e}")))?;
        if text.len() > MAX_MESSAGE {
            return Err(bad_message(format!("longer than {MAX_MESSAGE} bytes")));
        }
        if n == 0 {
            return Err(bad_message("it ended before its empty line".into()));
        }
        if &text[start..] == "\n" {
            return Ok(text);
        }
    }
}

/// The timestamp clock asked for (`--clock`): the names the recorder's
/// clock sources go by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentClock {
    /// `tsc`: ordered TSC reads.
    Tsc,
    /// `tsc-unordered`: plain TSC reads.
    TscUnordered,
    /// `monotonic`: `clock_gettime(CLOCK_MONOTONIC)`.
    Monotonic,
}

impl AgentClock {
    /// Every name, in the order of the variants.
    pub const NAMES: [&'static str; 3] = ["tsc", "tsc-unordered", "monotonic"];
    const ALL: [AgentClock; 3] = [AgentClock::Tsc, AgentClock::TscUnordered, AgentClock::Monotonic];

    /// Its name.
    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// The clock of this name.
    pub fn parse(name: &str) -> Option<AgentClock> {
        Self::NAMES.iter().position(|n| *n == name).map(|i| Self::ALL[i])
    }
}

/// The settings `textpoke record` gives the agent (see the module docs).
/// `None` and empty lists mean unset: the agent's default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentConfig {
    /// The trace directory; relative: to the agent's working directory at
    /// load. Unset: [`DEFAULT_DIR`].
    pub dir: Option<PathBuf>,
    /// The process that writes `dir` itself; unset: the one that loads the
    /// agent.
    pub owner_pid: Option<i32>,
    /// Include globs (`-F`); none: every function.
    pub include: Vec<String>,
    /// Exclude globs (`-N`).
    pub exclude: Vec<String>,
    /// Count calls per function instead of recording entries and exits.
    pub count_only: bool,
    /// Do not trace calls into shared libraries through the PLT
    /// (`--no-libcall`, as uftrace's); traced by default.
    pub no_libcall: bool,
    /// Globs of the functions whose return values are recorded (`-R`).
    pub retval: Vec<String>,
    /// The most one thread's buffer may hold, bytes.
    pub buffer_size: Option<u64>,
    /// The most all buffers may hold together, bytes.
    pub memory_limit: Option<u64>,
    /// The timestamp clock; unset: the best this machine has.
    pub clock: Option<AgentClock>,
    /// Where the control socket goes. Unset: the default of the agent's
    /// environment ([`default_socket_dir`](crate::default_socket_dir));
    /// [`AgentConfig::apply_to`] then leaves the variable as the command
    /// inherits it.
    pub socket_dir: Option<PathBuf>,
    /// `textpoke record`, which the agent watches.
    pub front: Option<FrontProcess>,
}

/// A variable the agent could not use; it takes the default instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigWarning {
    /// A size that is not a number of bytes ([`BUFFER_SIZE_ENV`],
    /// [`MEMORY_LIMIT_ENV`]).
    NotASize { var: &'static str, value: String },
    /// A clock that is not one of [`AgentClock::NAMES`].
    UnknownClock { value: String },
    /// A [`FRONT_ENV`] that is not `PID:START`: `textpoke record` is not
    /// watched. Tracing goes on, so this is a note rather than an error.
    BadFront { value: String, why: String },
}

impl std::fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigWarning::NotASize { var, value } => {
                write!(f, "{var}={value:?} is not a number of bytes; using the default")
            }
            ConfigWarning::UnknownClock { value } => {
                write!(f, "{CLOCK_ENV}={value:?} is not tsc, tsc-unordered or monotonic; using the default")
            }
            ConfigWarning::BadFront { why, .. } => {
                write!(f, "{why}; ignored: tracing will not stop if textpoke record is killed")
            }
        }
    }
}

/// Non-empty lines of a list variable.
fn lines_of(v: &str) -> Vec<String> {
    v.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

impl AgentConfig {
    /// The settings in this process's environment, and what was wrong
    /// with them (see the module docs).
    pub fn from_env() -> (AgentConfig, Vec<ConfigWarning>) {
        AgentConfig::from_vars(|k| std::env::var_os(k))
    }

    /// The settings in an environment (`get` looks a variable up), and
    /// what was wrong with them.
    pub fn from_vars(get: impl Fn(&str) -> Option<OsString>) -> (AgentConfig, Vec<ConfigWarning>) {
        let text = |k: &str| get(k).and_then(|v| v.into_string().ok());
        let list = |k: &str| text(k).map(|v| lines_of(&v)).unwrap_or_default();
        let mut warnings = Vec::new();
        let mut size = |var: &'static str| {
            let v = text(var)?;
            match v.trim().parse() {
                Ok(n) => Some(n),
                Err(_) => {
                    warnings.push(ConfigWarning::NotASize { var, value: v });
                    None
                }
            }
        };
        let (buffer_size, memory_limit) = (size(BUFFER_SIZE_ENV), size(MEMORY_LIMIT_ENV));
        let clock = text(CLOCK_ENV).and_then(|v| {
            let c = AgentClock::parse(&v);
            if c.is_none() {
                warnings.push(ConfigWarning::UnknownClock { value: v });
            }
            c
        });
        let front = text(FRONT_ENV).and_then(|v| match FrontProcess::parse(&v) {
            Ok(f) => Some(f),
            Err(e) => {
                warnings.push(ConfigWarning::BadFront { value: v, why: e.to_string() });
                None
            }
        });
        let config = AgentConfig {
            dir: get(DIR_ENV).map(PathBuf::from),
            owner_pid: text(PID_ENV).and_then(|p| p.parse().ok()),
            include: list(INCLUDE_ENV),
            exclude: list(EXCLUDE_ENV),
            count_only: get(COUNT_ONLY_ENV).is_some_and(|v| v == "1"),
            no_libcall: get(NO_LIBCALL_ENV).is_some_and(|v| v == "1"),
            retval: list(RETVAL_ENV),
            buffer_size,
            memory_limit,
            clock,
            socket_dir: get(SOCKET_DIR_ENV).filter(|d| !d.is_empty()).map(PathBuf::from),
            front,
        };
        (config, warnings)
    }

    /// The variables to set (`Some`) or remove (`None`) so that an agent
    /// started with them reads these settings. The socket directory is
    /// left out when unset (the command's inherited value then decides).
    pub fn to_env(&self) -> Vec<(&'static str, Option<OsString>)> {
        let list = |globs: &[String]| (!globs.is_empty()).then(|| OsString::from(globs.join("\n")));
        let number = |n: Option<u64>| n.map(|n| OsString::from(n.to_string()));
        let mut vars = vec![
            (DIR_ENV, self.dir.clone().map(PathBuf::into_os_string)),
            (PID_ENV, self.owner_pid.map(|p| OsString::from(p.to_string()))),
            (INCLUDE_ENV, list(&self.include)),
            (EXCLUDE_ENV, list(&self.exclude)),
            (COUNT_ONLY_ENV, self.count_only.then(|| OsString::from("1"))),
            (NO_LIBCALL_ENV, self.no_libcall.then(|| OsString::from("1"))),
            (RETVAL_ENV, list(&self.retval)),
            (BUFFER_SIZE_ENV, number(self.buffer_size)),
            (MEMORY_LIMIT_ENV, number(self.memory_limit)),
            (CLOCK_ENV, self.clock.map(|c| OsString::from(c.name()))),
            (FRONT_ENV, self.front.map(|f| OsString::from(f.to_env()))),
        ];
        if let Some(d) = &self.socket_dir {
            vars.push((SOCKET_DIR_ENV, Some(d.clone().into_os_string())));
        }
        vars
    }

    /// Sets (or removes) the variables of [`AgentConfig::to_env`] in the
    /// environment `cmd` will run with.
    pub fn apply_to(&self, cmd: &mut std::process::Command) {
        for (var, value) in self.to_env() {
            match value {
                Some(v) => cmd.env(var, v),
                None => cmd.env_remove(var),
            };
        }
    }

    /// The settings as a message (see the module docs), ending with its
    /// empty line.
    pub fn to_message(&self) -> String {
        let mut m = format!("{MESSAGE_HEADER} {MESSAGE_VERSION}\n");
        let mut line = |key: &str, value: Option<&[u8]>| {
            m.push_str(key);
            if let Some(v) = value {
                m.push(' ');
                escape_into(&mut m, v);
            }
            m.push('\n');
        };
        if let Some(d) = &self.dir {
            line("dir", Some(d.as_os_str().as_bytes()));
        }
        if let Some(p) = self.owner_pid {
            line("owner-pid", Some(p.to_string().as_bytes()));
        }
        for (key, globs) in [("include", &self.include), ("exclude", &self.exclude)] {
            for g in globs {
                line(key, Some(g.as_bytes()));
            }
        }
        if self.count_only {
            line("count-only", None);
        }
        if self.no_libcall {
            line("no-libcall", None);
        }
        for g in &self.retval {
            line("retval", Some(g.as_bytes()));
        }
        for (key, n) in [("buffer-size", self.buffer_size), ("memory-limit", self.memory_limit)] {
            if let Some(n) = n {
                line(key, Some(n.to_string().as_bytes()));
            }
        }
        if let Some(c) = self.clock {
            line("clock", Some(c.name().as_bytes()));
        }
        if let Some(d) = &self.socket_dir {
            line("socket-dir", Some(d.as_os_str().as_bytes()));
        }
        if let Some(f) = self.front {
            line("front", Some(f.to_env().as_bytes()));
        }
        m.push('\n');
        m
    }

    /// Parses a message made by [`AgentConfig::to_message`] (its final
    /// empty line may be left out).
    pub fn from_message(text: &str) -> Result<AgentConfig, ControlError> {
        let mut lines = text.split('\n');
        let header = lines.next().unwrap_or_default();
        let want = format!("{MESSAGE_HEADER} {MESSAGE_VERSION}");
        if header != want {
            return Err(bad_message(format!("the first line is {:?}, not {want:?}", shorten(header))));
        }
        let mut config = AgentConfig::default();
        let mut ended = false;
        for (i, line) in lines.enumerate() {
            let number = i + 2;
            if ended {
                if line.is_empty() {
                    continue; // the text's own final newline
                }
                return Err(bad_message(format!("line {number}: text after the message's empty line")));
            }
            if line.is_empty() {
                ended = true;
                continue;
            }
            config.set(line).map_err(|why| bad_message(format!("line {number} ({:?}): {why}", shorten(line))))?;
        }
        Ok(config)
    }

    /// Reads one message from `r`, up to and with its empty line, at most
    /// [`MAX_MESSAGE`] bytes.
    pub fn read_message(r: &mut impl BufRead) -> Result<AgentConfig, ControlError> {
        AgentConfig::from_message(&read_until_empty_line(r)?)
    }

    /// Takes one `KEY VALUE` line of a message.
    fn set(&mut self, line: &str) -> Result<(), String> {
        let (key, raw) = match line.split_once(' ') {
            Some((k, v)) => (k, Some(v)),
            None => (line, None),
        };
        let value = || -> Result<Vec<u8>, String> { unescape(raw.ok_or("no value")?) };
        let text = || -> Result<String, String> { String::from_utf8(value()?).map_err(|_| "not UTF-8".to_owned()) };
        let number = || -> Result<u64, String> { text()?.parse().map_err(|_| "not a number".to_owned()) };
        fn once<T>(slot: &mut Option<T>, v: T) -> Result<(), String> {
            match slot.replace(v) {
                Some(_) => Err("given twice".into()),
                None => Ok(()),
            }
        }
        match key {
            "dir" => once(&mut self.dir, PathBuf::from(OsString::from_vec(value()?))),
            "owner-pid" => once(&mut self.owner_pid, text()?.parse().map_err(|_| "not a pid")?),
            "include" => {
                self.include.push(text()?);
                Ok(())
            }
            "exclude" => {
                self.exclude.push(text()?);
                Ok(())
            }
            "retval" => {
                self.retval.push(text()?);
                Ok(())
            }
            "count-only" if raw.is_some() => Err("takes no value".into()),
            "count-only" if self.count_only => Err("given twice".into()),
            "count-only" => {
                self.count_only = true;
                Ok(())
            }
            "no-libcall" if raw.is_some() => Err("takes no value".into()),
            "no-libcall" if self.no_libcall => Err("given twice".into()),
            "no-libcall" => {
                self.no_libcall = true;
                Ok(())
            }
            "buffer-size" => once(&mut self.buffer_size, number()?),
            "memory-limit" => once(&mut self.memory_limit, number()?),
            "clock" => {
                let name = text()?;
                let clock = AgentClock::parse(&name).ok_or_else(|| format!("not one of {:?}", AgentClock::NAMES))?;
                once(&mut self.clock, clock)
            }
            "socket-dir" => once(&mut self.socket_dir, PathBuf::from(OsString::from_vec(value()?))),
            "front" => once(&mut self.front, FrontProcess::parse(&text()?).map_err(|e| e.to_string())?),
            _ => Err("unknown setting".into()),
        }
    }

    /// The trace directory, made absolute from `cwd`.
    pub fn dir_from(&self, cwd: &std::path::Path) -> PathBuf {
        cwd.join(self.dir.as_deref().unwrap_or(std::path::Path::new(DEFAULT_DIR)))
    }
}

fn bad_message(why: String) -> ControlError {
    ControlError::Protocol(format!("agent settings: {why}"))
}

/// Appends `bytes` to `out` escaped (see the module docs, "The message").
fn escape_into(out: &mut String, bytes: &[u8]) {
    use std::fmt::Write as _;
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                c if c.is_ascii_control() => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
}

/// The bytes an escaped value stands for.
fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut rest = s.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        rest = tail;
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match rest {
            [b'\\', tail @ ..] => {
                out.push(b'\\');
                rest = tail;
            }
            [b'x', tail @ ..] => {
                let hex = |i: usize| tail.get(i).and_then(|&d| (d as char).to_digit(16));
                let (Some(h), Some(l)) = (hex(0), hex(1)) else {
                    return Err("a bad \\x escape (two hex digits expected)".into());
                };
                out.push((h * 16 + l) as u8);
                rest = &tail[2..];
            }
            _ => return Err("a bad escape (\\\\ or \\xHH expected)".into()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::ffi::OsStr;

    fn full() -> AgentConfig {
        AgentConfig {
            dir: Some(PathBuf::from("/tmp/a dir/with\\back\nslash/\u{e9}")),
            owner_pid: Some(4242),
            include: vec!["work*".into(), "main".into()],
            exclude: vec!["leaf".into()],
            count_only: true,
            no_libcall: true,
            retval: vec!["fib".into(), "r*".into()],
            buffer_size: Some(64 << 20),
            memory_limit: Some(1 << 30),
            clock: Some(AgentClock::TscUnordered),
            socket_dir: Some(PathBuf::from("/run/user/1000/textpoke")),
            front: Some(FrontProcess { pid: 4200, start: 98765 }),
        }
    }

    /// An environment holding what `to_env` sets.
    fn env_of(c: &AgentConfig) -> HashMap<&'static str, OsString> {
        c.to_env().into_iter().filter_map(|(k, v)| Some((k, v?))).collect()
    }

    fn from_map(env: &HashMap<&'static str, OsString>) -> (AgentConfig, Vec<ConfigWarning>) {
        AgentConfig::from_vars(|k| env.get(k).cloned())
    }

    #[test]
    fn the_environment_round_trips() {
        let mut non_utf8 = full();
        non_utf8.dir = Some(PathBuf::from(OsString::from_vec(b"/tmp/\xff\xfe".to_vec())));
        for c in [full(), AgentConfig::default(), non_utf8] {
            assert_eq!(from_map(&env_of(&c)), (c.clone(), vec![]), "{c:?}");
        }
        let unset = AgentConfig::default().to_env();
        assert!(unset.iter().all(|(_, v)| v.is_none()), "unset settings are removed: {unset:?}");
        assert!(!unset.iter().any(|(k, _)| *k == SOCKET_DIR_ENV), "an unset socket dir is left as inherited");
    }

    #[test]
    fn apply_to_sets_and_removes() {
        let mut cmd = std::process::Command::new("true");
        cmd.env(COUNT_ONLY_ENV, "1").env(PID_ENV, "7");
        full().apply_to(&mut cmd);
        AgentConfig { dir: Some("d".into()), ..AgentConfig::default() }.apply_to(&mut cmd);
        let envs: HashMap<&OsStr, Option<&OsStr>> = cmd.get_envs().collect();
        assert_eq!(envs[OsStr::new(DIR_ENV)], Some(OsStr::new("d")));
        for var in [PID_ENV, COUNT_ONLY_ENV, INCLUDE_ENV, CLOCK_ENV, FRONT_ENV] {
            assert_eq!(envs[OsStr::new(var)], None, "{var} removed");
        }
        assert_eq!(envs[OsStr::new(SOCKET_DIR_ENV)], Some(OsStr::new("/run/user/1000/textpoke")));
    }

    #[test]
    fn bad_values_are_warned_about_and_the_defaults_taken() {
        let env: HashMap<&'static str, OsString> = [
            (BUFFER_SIZE_ENV, "64M"),
            (MEMORY_LIMIT_ENV, " 1024 "),
            (CLOCK_ENV, "rdtsc"),
            (FRONT_ENV, "12"),
            (PID_ENV, "me"),
            (COUNT_ONLY_ENV, "yes"),
            (INCLUDE_ENV, "a\n\nb\n"),
            (SOCKET_DIR_ENV, ""),
        ]
        .into_iter()
        .map(|(k, v)| (k, OsString::from(v)))
        .collect();
        let (c, warnings) = from_map(&env);
        assert_eq!(c.buffer_size, None);
        assert_eq!(c.memory_limit, Some(1024), "spaces around a number are fine");
        assert_eq!((c.clock, c.front, c.owner_pid, c.count_only), (None, None, None, false));
        assert_eq!(c.include, ["a", "b"], "empty lines are skipped");
        assert_eq!(c.socket_dir, None, "an empty socket dir is unset");
        let text: Vec<String> = warnings.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "TEXTPOKE_BUFFER_SIZE=\"64M\" is not a number of bytes; using the default",
                "TEXTPOKE_CLOCK=\"rdtsc\" is not tsc, tsc-unordered or monotonic; using the default",
                "bad control message: TEXTPOKE_RECORD_PID=\"12\" is not PID:START (two decimal numbers); \
                 ignored: tracing will not stop if textpoke record is killed",
            ]
        );
        let not_utf8 = HashMap::from([(INCLUDE_ENV, OsString::from_vec(b"a\xff".to_vec()))]);
        assert_eq!(from_map(&not_utf8), (AgentConfig::default(), vec![]), "a list that is not UTF-8 is unset");
    }

    #[test]
    fn the_message_round_trips() {
        let mut odd = full();
        odd.dir = Some(PathBuf::from(OsString::from_vec(b"/tmp/\xff\\x41\r\x7f \x00".to_vec())));
        odd.include = vec!["".into(), " lead".into(), "a\\xb".into(), "new\nline".into()];
        for c in [full(), AgentConfig::default(), odd] {
            let m = c.to_message();
            assert!(m.ends_with("\n\n") && m.matches("\n\n").count() == 1, "one empty line, at the end: {m:?}");
            assert!(!m.contains('\r') && !m.contains('\0'), "{m:?}");
            assert_eq!(AgentConfig::from_message(&m).unwrap(), c, "{m}");
            assert_eq!(AgentConfig::from_message(m.trim_end_matches('\n')).unwrap(), c, "without the empty line");
            let mut stream = std::io::Cursor::new(format!("{m}status\n"));
            assert_eq!(AgentConfig::read_message(&mut stream).unwrap(), c);
            assert_eq!(stream.position() as usize, m.len(), "read up to the empty line, no further");
        }
        let m = full().to_message();
        assert!(m.starts_with("textpoke-agent-config 1\ndir /tmp/a dir/with\\\\back\\x0aslash/\u{e9}\n"), "{m}");
    }

    #[test]
    fn bad_messages_say_which_line() {
        let why = |m: &str| AgentConfig::from_message(m).unwrap_err().to_string();
        let header = "textpoke-agent-config 1\n";
        assert!(why("textpoke-agent-config 2\n\n").contains("the first line is \"textpoke-agent-config 2\""));
        assert!(why("").contains("the first line"));
        for (body, want) in [
            ("frob 1\n", "line 2 (\"frob 1\"): unknown setting"),
            ("dir /a\ndir /b\n", "line 3 (\"dir /b\"): given twice"),
            ("buffer-size 64M\n", "not a number"),
            ("buffer-size\n", "no value"),
            ("clock rdtsc\n", "not one of [\"tsc\", \"tsc-unordered\", \"monotonic\"]"),
            ("count-only 1\n", "takes no value"),
            ("count-only\ncount-only\n", "given twice"),
            ("front 12\n", "not PID:START"),
            ("owner-pid x\n", "not a pid"),
            ("dir /a\\q\n", "a bad escape"),
            ("dir /a\\x4\n", "a bad \\x escape"),
            ("include \\xff\n", "not UTF-8"),
            ("\ndir /a\n", "line 3: text after the message's empty line"),
        ] {
            let e = why(&format!("{header}{body}"));
            assert!(e.contains(want), "{body:?}: {e}");
        }
        let mut short = std::io::Cursor::new(format!("{header}dir /a\n"));
        assert!(AgentConfig::read_message(&mut short).unwrap_err().to_string().contains("ended before its empty line"));
        let mut huge = std::io::Cursor::new(format!("{header}include {}\n\n", "x".repeat(MAX_MESSAGE)));
        assert!(AgentConfig::read_message(&mut huge).unwrap_err().to_string().contains("longer than"));
    }

    #[test]
    fn a_session_starts_with_settings_or_as_a_patch_session() {
        let c = full();
        let mut r = std::io::Cursor::new(format!("{}patch-list\n", c.to_message()));
        assert_eq!(SessionStart::read(&mut r).unwrap(), SessionStart::Record(c));
        let mut r = std::io::Cursor::new(format!("{PATCH_SESSION}patch-list\n"));
        assert_eq!(SessionStart::read(&mut r).unwrap(), SessionStart::Patch);
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut r, &mut rest).unwrap();
        assert_eq!(rest, "patch-list\n", "the requests after it are left to read");
        for bad in ["textpoke-patch-session 2\n\n", "textpoke-patch-session 1\nx\n\n", "textpoke-patch-session 1\n"] {
            assert!(SessionStart::read(&mut std::io::Cursor::new(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn clock_names() {
        for (i, name) in AgentClock::NAMES.iter().enumerate() {
            let c = AgentClock::parse(name).unwrap();
            assert_eq!((c.name(), c as usize), (*name, i));
        }
        assert_eq!(AgentClock::parse("TSC"), None);
    }

    #[test]
    fn the_directory_defaults_relative_to_the_working_directory() {
        let cwd = std::path::Path::new("/work");
        assert_eq!(AgentConfig::default().dir_from(cwd), PathBuf::from("/work/textpoke.data"));
        let c = AgentConfig { dir: Some("/abs".into()), ..AgentConfig::default() };
        assert_eq!(c.dir_from(cwd), PathBuf::from("/abs"));
        let c = AgentConfig { dir: Some("rel".into()), ..AgentConfig::default() };
        assert_eq!(c.dir_from(cwd), PathBuf::from("/work/rel"));
    }
}
