//! The control socket shared by the agent (`textpoke-agent`, the server in
//! the traced process) and `textpoke ctl` (the client): where the socket
//! lives, the ownership checks on both ends, and the line protocol.
//!
//! A crate of its own, using nothing of textpoke (it was the engine's
//! `textpoke::control` module): the two ends and the fuzzer need the
//! protocol and nothing else — `textpoke ctl` needs no recorder, the
//! fuzzer no tracer — and the engine crate `textpoke` carries nothing
//! only a front end needs.
//!
//! # Where
//!
//! One Unix-domain stream socket per traced process, `<pid>.sock`, in a
//! per-user directory:
//!
//! 1. `$TEXTPOKE_SOCKET_DIR` when set (tests, or a custom place);
//! 2. else `$XDG_RUNTIME_DIR/textpoke/` when `XDG_RUNTIME_DIR` is set;
//! 3. else `/tmp/textpoke-<uid>/`.
//!
//! The directory is created with mode 0700 and, before it is used by
//! either side, must be a real directory (not a symbolic link) owned by the
//! effective uid with no group or other permission bits
//! ([`check_private_dir`]). The socket is made 0600; the client checks
//! that it is a socket owned by its own uid with no group or other bits
//! ([`check_socket`]) before connecting, so a socket planted by another
//! user is refused rather than talked to. The agent also checks the
//! peer's credentials (`SO_PEERCRED`) on every connection.
//!
//! # Protocol
//!
//! Requests are one line each, at most [`MAX_REQUEST_LINE`] bytes before
//! the newline (`\r\n` is accepted too); a connection may carry several,
//! and each gets its reply in order:
//!
//! ```text
//! status
//! enable GLOB
//! disable GLOB
//! patch-load PATH
//! patch-revert [ID]
//! patch-done ID SEQ
//! patch-report
//! patch-force
//! patch-list
//! patch-nudge MS|off
//! ```
//!
//! Each reply is a first line `ok` or `error MESSAGE`, then zero or more
//! `KEY VALUE` lines, then an empty line. `status` answers with (in this
//! order) `pid`, `process`, `state` (`recording`, `stopped (WHY)`, `idle`
//! or `failed`), `mode` (`record` or `count`), `dir`, `functions`
//! (traceable functions found), `traced` (functions the recording op
//! traces now), `sites` (sites traced now), `inline` (of those, the ones
//! recorded by generated code), `calls` (calls counted so far, exact),
//! `events` (entry and exit events written so far; 0 in count mode),
//! `dropped` (events lost), and one `rule +GLOB` or `rule -GLOB`
//! line per filter rule. `enable` and `disable` answer with `traced` and
//! `functions`; an error may carry `hint` lines (close function names).
//!
//! The `patch-*` verbs are live patching's (`textpoke patch`, issue 12;
//! see [`PatchVerb`]). They are answered at once, never after a
//! transition: the agent's live-patch thread drives a transition, and the
//! client polls `patch-done`.
//!
//! - `patch-load PATH` loads the patch object at `PATH` (absolute, a path
//!   in the target's mount namespace, UTF-8) and starts its transition:
//!   `id`, `name`, `replace` (`yes`/`no`), one `function NAME` line per
//!   replaced function, `seq` (the number to give `patch-done`) and
//!   `load-us` (the `dlopen`, resolution and start).
//! - `patch-revert` reverts the newest patch, `patch-revert ID` patch `ID`
//!   (during that patch's own transition: reverses it): `id`, `name`,
//!   `seq`, `reversal` (`yes` when it reversed a transition in progress).
//!   Refused, naming both, when another patch is stacked on it.
//! - `patch-done ID SEQ`: `state pending`, or `state complete` with
//!   `direction` (`patched` or `reverted`), `took-us` and `forced`
//!   (`yes`/`no`) for the first completion of patch `ID` numbered `SEQ` or
//!   later.
//! - `patch-report`: `transition none`, or `transition pending` with
//!   `patch`, `name`, `direction` (`patching` or `unpatching`),
//!   `reversals`, `elapsed-ms`, and one `thread` line per thread that has
//!   not switched (`tid 4242 (worker-3): holds outer() [old] (frame 2),
//!   blocked in read(2) for 12.4 s`, as the engine's `ThreadReport` says it).
//! - `patch-force` completes the transition in progress by force: `patch`,
//!   `direction`, `took-us`, one `forced` line per thread switched so (the
//!   same text as `thread`).
//! - `patch-list`: one `patch` line per applied patch, oldest first:
//!   `ID STATE FORCED REPLACE FUNCTIONS NAME`, `STATE` one of `patching`,
//!   `enabled`, `unpatching`, `FORCED` and `REPLACE` `yes`/`no`,
//!   `FUNCTIONS` the replaced functions joined by `,`, `NAME` the rest of
//!   the line.
//! - `patch-nudge MS` turns the opt-in nudge on (`textpoke::live::
//!   Patcher::set_nudge`: threads running user code that are still
//!   pending after `MS` milliseconds get a signal whose handler checks
//!   and switches them; never a thread the kernel shows in a system
//!   call), `patch-nudge off` off: `nudge` (`MS` or `off`).
//!
//! Every malformed request gets an `error` reply ([`Request::parse_bytes`]
//! says why: not UTF-8, a NUL byte, an unknown verb, a missing glob), and
//! the connection stays usable. Two errors also close the connection after
//! their reply, since the rest of the input cannot be read as requests: a
//! line longer than [`MAX_REQUEST_LINE`], and input that ends in the
//! middle of a line.
//!
//! ## How the agent serves it
//!
//! The agent serves every connection from its one thread, without ever
//! blocking on one of them (see the agent's `clients` module): a client
//! that connects and sends nothing, or half a line, delays no other. It
//! keeps at most a few dozen connections (fewer under a low
//! `RLIMIT_NOFILE`); beyond that, the least recently active one is closed
//! after an `error too many connections` reply. Half a line must be
//! completed within 5 s, and a reply read within 5 s, or the connection
//! is closed. A connection that is idle between requests stays open until
//! it is the least recently active one of a full table.
//!
//! When an agent makes its socket, it removes the sockets of processes
//! that are gone from the same directory: files named `<pid>.sock` (not
//! followed if they are symbolic links) that are sockets, owned by the
//! effective uid, whose pid no longer exists, and on which nobody listens
//! (a connection attempt is refused: the last check keeps the socket of a
//! live agent in another pid namespace sharing the directory).
//!
//! Filter rules are applied in order, the last one that matches a function
//! deciding: `textpoke record -F a -F b -N c` starts with `+a +b -c` (no
//! `-F` starts with `+*`), `disable '*'` then `enable 'work*'` traces only
//! the `work*` functions.
//!
//! # The front process
//!
//! `textpoke record` tells the agent who it is in [`FRONT_ENV`]
//! (`PID:START`, START being the process's start time in clock ticks after
//! boot, the 22nd field of `/proc/PID/stat`, 0 when unknown; see
//! [`FrontProcess`]). The pid alone could name another process once the
//! front one is gone and its pid reused: the start time tells them apart.
//! The agent watches that process and, when it is gone (killed, crashed),
//! finishes the trace and stops tracing while the program runs on.
//!
//! # The settings of a recording
//!
//! What `textpoke record` asks of the agent (the trace directory, the
//! filters, the buffer sizes, the clock, the front process...) is one type,
//! [`AgentConfig`], passed in the environment of a program started under
//! `textpoke record`, or as a message to an agent injected into a running
//! one; the [`agent`] module holds both forms and the variables' names.

pub mod agent;

pub use agent::{AgentClock, AgentConfig, ConfigWarning, SessionStart, PATCH_SESSION};

use std::ffi::OsString;
use std::io::BufRead;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Environment variable naming the socket directory.
pub const SOCKET_DIR_ENV: &str = "TEXTPOKE_SOCKET_DIR";

/// Environment variable naming the front process (`textpoke record`).
pub const FRONT_ENV: &str = "TEXTPOKE_RECORD_PID";

/// The longest request line the agent reads, in bytes, newline excluded.
pub const MAX_REQUEST_LINE: usize = 4096;

/// Why a control-socket step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    #[error("{path} is not a safe socket directory: {why}")]
    UnsafeDirectory { path: PathBuf, why: String },

    #[error("refusing {path}: it is owned by uid {owner}, not by you (uid {uid})")]
    ForeignSocket { path: PathBuf, owner: u32, uid: u32 },

    #[error("refusing {path}: {why}")]
    UnsafeSocket { path: PathBuf, why: String },

    #[error("cannot {what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },

    #[error("bad control message: {0}")]
    Protocol(String),
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// The socket directory for an environment (`env` looks a variable up).
pub fn socket_dir(env: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    if let Some(d) = env(SOCKET_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = env("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("textpoke");
    }
    PathBuf::from(format!("/tmp/textpoke-{}", euid()))
}

/// The socket directory of this process's environment.
pub fn default_socket_dir() -> PathBuf {
    socket_dir(|k| std::env::var_os(k))
}

/// The socket of process `pid` in `dir`.
pub fn socket_path(dir: &Path, pid: i32) -> PathBuf {
    dir.join(format!("{pid}.sock"))
}

/// Checks that `dir` is a directory (not a link) owned by the effective
/// uid, with no group or other permission bits.
pub fn check_private_dir(dir: &Path) -> Result<(), ControlError> {
    let unsafe_dir = |why: String| ControlError::UnsafeDirectory { path: dir.to_path_buf(), why };
    let m = std::fs::symlink_metadata(dir).map_err(|source| ControlError::Io {
        what: "inspect",
        path: dir.to_path_buf(),
        source,
    })?;
    if !m.file_type().is_dir() {
        return Err(unsafe_dir("not a directory (a symbolic link or a file)".into()));
    }
    if m.uid() != euid() {
        return Err(unsafe_dir(format!("owned by uid {}, not by you (uid {})", m.uid(), euid())));
    }
    if m.mode() & 0o077 != 0 {
        return Err(unsafe_dir(format!("mode {:o} lets other users in; it must be 0700", m.mode() & 0o7777)));
    }
    Ok(())
}

/// Creates `dir` with mode 0700 if it does not exist (its parent must), then
/// checks it as [`check_private_dir`] does.
pub fn prepare_private_dir(dir: &Path) -> Result<(), ControlError> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => return Err(ControlError::Io { what: "create directory", path: dir.to_path_buf(), source }),
    }
    check_private_dir(dir)
}

/// Checks that `path` is a socket owned by the effective uid with mode
/// 0600 or stricter, in a private directory.
pub fn check_socket(path: &Path) -> Result<(), ControlError> {
    if let Some(dir) = path.parent() {
        check_private_dir(dir)?;
    }
    let m = std::fs::symlink_metadata(path).map_err(|source| ControlError::Io {
        what: "inspect",
        path: path.to_path_buf(),
        source,
    })?;
    if m.uid() != euid() {
        return Err(ControlError::ForeignSocket { path: path.to_path_buf(), owner: m.uid(), uid: euid() });
    }
    if !m.file_type().is_socket() {
        return Err(ControlError::UnsafeSocket { path: path.to_path_buf(), why: "not a socket".into() });
    }
    if m.mode() & 0o077 != 0 {
        let why = format!("mode {:o} lets other users in; it must be 0600", m.mode() & 0o7777);
        return Err(ControlError::UnsafeSocket { path: path.to_path_buf(), why });
    }
    Ok(())
}

/// Makes the socket file at `path` mode 0600.
pub fn restrict_socket(path: &Path) -> Result<(), ControlError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| ControlError::Io {
        what: "chmod",
        path: path.to_path_buf(),
        source,
    })
}

/// The `textpoke record` process an agent reports to, as passed in
/// [`FRONT_ENV`] (see the crate docs, "The front process").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontProcess {
    pub pid: i32,
    /// Start time in clock ticks after boot (`/proc/PID/stat`); 0: unknown.
    pub start: u64,
}

impl FrontProcess {
    /// This process.
    pub fn this() -> FrontProcess {
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        FrontProcess { pid, start: proc_stat(pid).map_or(0, |s| s.start) }
    }

    /// The value of [`FRONT_ENV`]: `PID:START`.
    pub fn to_env(&self) -> String {
        format!("{}:{}", self.pid, self.start)
    }

    /// Reads a [`FRONT_ENV`] value.
    pub fn parse(v: &str) -> Result<FrontProcess, ControlError> {
        let bad = || ControlError::Protocol(format!("{FRONT_ENV}={v:?} is not PID:START (two decimal numbers)"));
        let (pid, start) = v.split_once(':').ok_or_else(bad)?;
        let pid: i32 = pid.parse().map_err(|_| bad())?;
        let start: u64 = start.parse().map_err(|_| bad())?;
        if pid <= 0 {
            return Err(bad());
        }
        Ok(FrontProcess { pid, start })
    }
}

/// What `/proc/PID/stat` says of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// The state letter (`R`, `S`, `Z` for a zombie, ...).
    pub state: char,
    /// Start time in clock ticks after boot.
    pub start: u64,
}

/// Reads `/proc/PID/stat`; `None` if it cannot be read or parsed.
pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Parses a `/proc/PID/stat` line. The command name (2nd field) is in
/// parentheses and may hold spaces and parentheses itself: the fields
/// that follow start after the last `)`.
fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 3 is the state; the start time is field 22.
    let start = fields.nth(22 - 4)?.parse().ok()?;
    Some(ProcStat { state, start })
}

/// A request to the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// What is traced and recorded.
    Status,
    /// Trace the functions matching the glob (a `+GLOB` rule).
    Enable(String),
    /// Stop tracing the functions matching the glob (a `-GLOB` rule).
    Disable(String),
    /// A live-patching request (`patch-*`).
    Patch(PatchVerb),
}

/// A live-patching request (see the crate docs, "Protocol").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PatchVerb {
    /// `patch-load PATH`: load a patch object and start its transition.
    Load(String),
    /// `patch-revert [ID]`: revert a patch (`None`: the newest).
    Revert(Option<u64>),
    /// `patch-done ID SEQ`: whether that transition completed.
    Done { id: u64, seq: u64 },
    /// `patch-report`: the transition in progress.
    Report,
    /// `patch-force`: complete the transition in progress by force.
    Force,
    /// `patch-list`: the applied patches.
    List,
    /// `patch-nudge MS|off`: the opt-in nudge after `MS` milliseconds
    /// (`None`: off).
    Nudge(Option<u64>),
}

impl PatchVerb {
    /// Parses the `patch-*` verb `verb` with its argument, if it is one.
    fn parse(verb: &str, arg: Option<&str>) -> Option<Result<PatchVerb, String>> {
        let number = |what: &str, s: &str| -> Result<u64, String> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("`{verb}`: {what} {:?} is not a number", shorten(s)));
            }
            s.parse().map_err(|_| format!("`{verb}`: {what} {:?} is too large", shorten(s)))
        };
        let no_arg = |v: PatchVerb| match arg {
            None => Ok(v),
            Some(_) => Err(format!("`{verb}` takes no argument")),
        };
        Some(match verb {
            "patch-load" => match arg {
                Some(p) if p.starts_with('/') => Ok(PatchVerb::Load(p.to_owned())),
                Some(p) => Err(format!(
                    "`patch-load` needs an absolute path (in the target's mount namespace), not {:?}",
                    shorten(p)
                )),
                None => Err("`patch-load` needs a PATH: `patch-load /path/to/patch.so`".into()),
            },
            "patch-revert" => match arg {
                None => Ok(PatchVerb::Revert(None)),
                Some(a) => number("patch id", a).map(|id| PatchVerb::Revert(Some(id))),
            },
            "patch-done" => match arg.and_then(|a| a.split_once(' ')) {
                Some((id, seq)) => number("patch id", id)
                    .and_then(|id| number("sequence number", seq).map(|seq| PatchVerb::Done { id, seq })),
                None => Err("`patch-done` needs a patch id and a sequence number: `patch-done ID SEQ`".into()),
            },
            "patch-report" => no_arg(PatchVerb::Report),
            "patch-force" => no_arg(PatchVerb::Force),
            "patch-list" => no_arg(PatchVerb::List),
            "patch-nudge" => match arg {
                Some("off") => Ok(PatchVerb::Nudge(None)),
                Some(ms) => number("delay", ms).map(|ms| PatchVerb::Nudge(Some(ms))),
                None => Err("`patch-nudge` needs a delay in milliseconds, or `off`: `patch-nudge 1000`".into()),
            },
            _ => return None,
        })
    }

    /// The request line, newline excluded.
    fn line(&self) -> String {
        match self {
            PatchVerb::Load(p) => format!("patch-load {p}"),
            PatchVerb::Revert(None) => "patch-revert".into(),
            PatchVerb::Revert(Some(id)) => format!("patch-revert {id}"),
            PatchVerb::Done { id, seq } => format!("patch-done {id} {seq}"),
            PatchVerb::Report => "patch-report".into(),
            PatchVerb::Force => "patch-force".into(),
            PatchVerb::List => "patch-list".into(),
            PatchVerb::Nudge(None) => "patch-nudge off".into(),
            PatchVerb::Nudge(Some(ms)) => format!("patch-nudge {ms}"),
        }
    }
}

impl Request {
    /// Parses one request line as received (newline optional), checking
    /// first that it is text: UTF-8 without NUL bytes.
    pub fn parse_bytes(line: &[u8]) -> Result<Request, ControlError> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > MAX_REQUEST_LINE {
            // The server refuses such a line before parsing; a glob of a
            // megabyte of `*` takes a second and 600 MB to compile.
            return Err(ControlError::Protocol(format!(
                "request line too long ({} bytes, at most {MAX_REQUEST_LINE})",
                line.len()
            )));
        }
        if line.contains(&0) {
            return Err(ControlError::Protocol("the request holds a NUL byte; requests are text lines".into()));
        }
        let text = std::str::from_utf8(line).map_err(|e| {
            ControlError::Protocol(format!("the request is not UTF-8 text (bad byte at offset {})", e.valid_up_to()))
        })?;
        Request::parse(text)
    }

    /// Parses one request line (its newline optional).
    pub fn parse(line: &str) -> Result<Request, ControlError> {
        let line = line.trim_end_matches(['\r', '\n']);
        let (verb, arg) = match line.split_once(' ') {
            Some((v, a)) => (v, Some(a)),
            None => (line, None),
        };
        let bad = |why: String| Err(ControlError::Protocol(why));
        if let Some(p) = PatchVerb::parse(verb, arg) {
            return p.map(Request::Patch).map_err(ControlError::Protocol);
        }
        match (verb, arg) {
            ("status", None) => Ok(Request::Status),
            ("enable", Some(g)) if !g.is_empty() => Ok(Request::Enable(g.to_owned())),
            ("disable", Some(g)) if !g.is_empty() => Ok(Request::Disable(g.to_owned())),
            ("enable" | "disable", _) => bad(format!("`{verb}` needs a GLOB: `{verb} GLOB`, e.g. `{verb} work*`")),
            ("status", Some(_)) => bad("`status` takes no argument".into()),
            _ => bad(format!(
                "unknown request {:?}; expected `status`, `enable GLOB`, `disable GLOB` or a `patch-*` verb",
                shorten(line)
            )),
        }
    }

    /// The request as one line, newline included.
    pub fn to_line(&self) -> String {
        match self {
            Request::Status => "status\n".into(),
            Request::Enable(g) => format!("enable {g}\n"),
            Request::Disable(g) => format!("disable {g}\n"),
            Request::Patch(v) => format!("{}\n", v.line()),
        }
    }
}

/// `s`, cut to 60 characters (with `...`) to be quoted in an error.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

/// A reply from the agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    /// `None` for `ok`, the message for `error MESSAGE`.
    pub error: Option<String>,
    /// `KEY VALUE` lines, in order.
    pub fields: Vec<(String, String)>,
}

impl Reply {
    /// A successful reply.
    pub fn ok() -> Reply {
        Reply::default()
    }

    /// A failure (line breaks in the message become spaces: it is sent as
    /// one line).
    pub fn error(message: impl Into<String>) -> Reply {
        Reply { error: Some(one_line(message.into())), fields: Vec::new() }
    }

    /// Appends a field (line breaks in the value become spaces: a field is
    /// sent as one line, and [`Reply::read`] would drop a trailing `\r`).
    pub fn field(mut self, key: &str, value: impl ToString) -> Reply {
        self.fields.push((key.to_owned(), one_line(value.to_string())));
        self
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Every value of `key`.
    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.fields.iter().filter(move |(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The reply as sent: status line, fields, empty line.
    pub fn to_text(&self) -> String {
        let mut s = match &self.error {
            None => "ok\n".to_owned(),
            Some(m) => format!("error {}\n", one_line(m.clone())),
        };
        for (k, v) in &self.fields {
            s.push_str(k);
            s.push(' ');
            s.push_str(&one_line(v.clone()));
            s.push('\n');
        }
        s.push('\n');
        s
    }

    /// Reads one reply.
    pub fn read(r: &mut impl BufRead) -> Result<Reply, ControlError> {
        let mut line = String::new();
        let mut next = |line: &mut String| -> Result<bool, ControlError> {
            line.clear();
            let n = r.read_line(line).map_err(|e| ControlError::Protocol(format!("reading the reply: {e}")))?;
            if n == 0 {
                return Ok(false);
            }
            while line.ends_with(['\n', '\r']) {
                line.pop();
            }
            Ok(true)
        };
        if !next(&mut line)? {
            return Err(ControlError::Protocol("the agent closed the connection without replying".into()));
        }
        let mut reply = match line.split_once(' ') {
            _ if line == "ok" => Reply::ok(),
            Some(("error", m)) => Reply::error(m),
            _ => return Err(ControlError::Protocol(format!("unexpected reply line {line:?}"))),
        };
        loop {
            if !next(&mut line)? {
                return Err(ControlError::Protocol("the reply ended early".into()));
            }
            if line.is_empty() {
                return Ok(reply);
            }
            let (k, v) = line.split_once(' ').unwrap_or((line.as_str(), ""));
            reply.fields.push((k.to_owned(), v.to_owned()));
        }
    }
}

/// `s` with its line breaks (`\n`, `\r`) as spaces.
fn one_line(s: String) -> String {
    if s.contains(['\n', '\r']) {
        s.replace(['\n', '\r'], " ")
    } else {
        s
    }
}

/// Levenshtein distance between `a` and `b` (characters) if it is at most
/// `limit`, else `limit + 1`. Stops as soon as a row's smallest value
/// passes `limit` (a distance only grows from row to row), so that names
/// far from the pattern cost a few rows rather than the whole table.
fn distance(a: &[char], b: &[char], limit: usize) -> usize {
    if a.len().abs_diff(b.len()) > limit {
        return limit + 1;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, &ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        let mut best = cur[0];
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
            best = best.min(cur[j + 1]);
        }
        if best > limit {
            return limit + 1;
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()].min(limit + 1)
}

/// Patterns longer than this (glob characters left out) get no hints: a
/// name that close to so long a pattern would match a typo of it, and
/// comparing it with every function of a big program would hold up the
/// agent, which serves every connection from one thread.
pub const MAX_HINT_PATTERN: usize = 128;

/// Up to `max` of `names` closest to the glob `pattern` by edit distance
/// (glob characters left out), for "did you mean" hints. A name is
/// compared whole, and also cut to the pattern's length when the pattern
/// ends with `*`. Only names within a third of the pattern's length (at
/// least 2 edits) are returned; a pattern longer than
/// [`MAX_HINT_PATTERN`] characters gets none.
pub fn close_names<'a>(pattern: &str, names: impl IntoIterator<Item = &'a str>, max: usize) -> Vec<String> {
    let literal: Vec<char> = pattern.chars().filter(|c| !matches!(c, '*' | '?' | '[' | ']' | '{' | '}')).collect();
    if literal.is_empty() || literal.len() > MAX_HINT_PATTERN {
        return Vec::new();
    }
    let prefix = pattern.ends_with('*');
    let limit = (literal.len() / 3).max(2);
    let mut chars = Vec::new();
    let mut scored: Vec<(usize, &str)> = names
        .into_iter()
        .filter_map(|n| {
            chars.clear();
            // Longer than the pattern and the limit: too far whole, and
            // only its start is compared for a prefix.
            chars.extend(n.chars().take(literal.len() + limit + 1));
            let mut d = distance(&literal, &chars, limit);
            if prefix && chars.len() > literal.len() {
                d = d.min(distance(&literal, &chars[..literal.len()], limit));
            }
            (d <= limit).then_some((d, n))
        })
        .collect();
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().take(max).map(|(_, n)| n.to_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for r in [Request::Status, Request::Enable("work*".into()), Request::Disable("a b".into())] {
            assert_eq!(Request::parse(&r.to_line()).unwrap(), r);
        }
        assert!(Request::parse("enable").is_err());
        assert!(Request::parse("frob x").is_err());
    }

    #[test]
    fn malformed_requests_say_why() {
        let why = |b: &[u8]| Request::parse_bytes(b).unwrap_err().to_string();
        assert_eq!(Request::parse_bytes(b"enable work*\r\n").unwrap(), Request::Enable("work*".into()));
        assert_eq!(Request::parse_bytes(b"status").unwrap(), Request::Status);
        assert!(why(b"enable \xff*\n").contains("not UTF-8 text (bad byte at offset 7)"));
        assert!(why(b"sta\0tus\n").contains("NUL byte"));
        assert!(why(b"enable \n").contains("`enable` needs a GLOB"));
        assert!(why(b"disable\n").contains("`disable` needs a GLOB"));
        assert!(why(b"status now\n").contains("takes no argument"));
        assert!(why(b"\n").contains("unknown request \"\""));
        assert!(why(b"frob\n").contains("unknown request \"frob\""));
        let mut huge = b"disable ".to_vec();
        huge.resize(1 << 20, b'*');
        assert!(why(&huge).contains("request line too long (1048576 bytes, at most 4096)"));
        let long = why(&[b'x'; 4000]);
        assert!(long.contains(&format!("unknown request \"{}...\"", "x".repeat(60))), "{long}");
    }

    #[test]
    fn patch_verbs_round_trip_and_malformed_ones_say_why() {
        let verbs = [
            PatchVerb::Load("/tmp/a dir/fix 1.so".into()),
            PatchVerb::Revert(None),
            PatchVerb::Revert(Some(3)),
            PatchVerb::Done { id: 2, seq: 17 },
            PatchVerb::Report,
            PatchVerb::Force,
            PatchVerb::List,
            PatchVerb::Nudge(None),
            PatchVerb::Nudge(Some(1000)),
        ];
        for v in verbs {
            let r = Request::Patch(v);
            assert_eq!(Request::parse_bytes(r.to_line().as_bytes()).unwrap(), r);
        }
        let why = |b: &[u8]| Request::parse_bytes(b).unwrap_err().to_string();
        assert!(why(b"patch-load\n").contains("needs a PATH"));
        assert!(why(b"patch-load fix.so\n").contains("absolute path"));
        assert!(why(b"patch-load \n").contains("absolute path"));
        assert!(why(b"patch-revert x\n").contains("patch id \"x\" is not a number"));
        assert!(why(b"patch-revert -1\n").contains("not a number"));
        assert!(why(b"patch-revert 99999999999999999999999\n").contains("too large"));
        assert!(why(b"patch-done 1\n").contains("`patch-done ID SEQ`"));
        assert!(why(b"patch-done 1 2 3\n").contains("sequence number \"2 3\""));
        assert!(why(b"patch-done +1 2\n").contains("not a number"));
        assert!(why(b"patch-list all\n").contains("takes no argument"));
        assert!(why(b"patch-force now\n").contains("takes no argument"));
        assert!(why(b"patch-report x\n").contains("takes no argument"));
        assert!(why(b"patch-nudge\n").contains("`patch-nudge 1000`"));
        assert!(why(b"patch-nudge soon\n").contains("delay \"soon\" is not a number"));
        assert!(why(b"patch-frob\n").contains("unknown request"));
        // Any byte string: an answer, never a panic; an accepted one
        // round-trips (a small exhaustive sweep over short lines).
        let alphabet: &[u8] = b"patch-lodrevisf 0129/ \r\n\xff";
        let mut line = Vec::new();
        for a in alphabet {
            for b in alphabet {
                for c in alphabet {
                    line.clear();
                    line.extend_from_slice(b"patch-");
                    line.extend([*a, *b, *c]);
                    if let Ok(r) = Request::parse_bytes(&line) {
                        assert_eq!(Request::parse_bytes(r.to_line().as_bytes()).unwrap(), r, "{line:?}");
                    }
                }
            }
        }
        for prefix in ["patch-load /", "patch-revert ", "patch-done 1 "] {
            for a in alphabet {
                for b in alphabet {
                    line.clear();
                    line.extend_from_slice(prefix.as_bytes());
                    line.extend([*a, *b]);
                    if let Ok(r) = Request::parse_bytes(&line) {
                        assert_eq!(Request::parse_bytes(r.to_line().as_bytes()).unwrap(), r, "{line:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn front_process_value_and_stat() {
        let f = FrontProcess { pid: 42, start: 1234 };
        assert_eq!(FrontProcess::parse(&f.to_env()).unwrap(), f);
        for bad in ["", "42", "42:", ":5", "x:1", "-3:1", "0:1", "1:2:3"] {
            assert!(FrontProcess::parse(bad).is_err(), "{bad:?}");
        }
        let line = "77 (a) b) c) S 1 77 77 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 200";
        assert_eq!(parse_stat(line), Some(ProcStat { state: 'S', start: 98765 }));
        assert_eq!(parse_stat("77 (x) Z 1 2"), None);
        let me = FrontProcess::this();
        assert_eq!(me.pid, std::process::id() as i32);
        assert!(me.start > 0, "this process's start time is readable");
        assert_eq!(proc_stat(me.pid).map(|s| s.start), Some(me.start));
    }

    #[test]
    fn replies_round_trip() {
        let r = Reply::ok().field("traced", 3).field("rule", "+*").field("rule", "-a b");
        let back = Reply::read(&mut std::io::Cursor::new(r.to_text())).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.all("rule").collect::<Vec<_>>(), ["+*", "-a b"]);
        let e = Reply::error("no function matches").field("hint", "work");
        assert_eq!(Reply::read(&mut std::io::Cursor::new(e.to_text())).unwrap(), e);
        assert!(Reply::read(&mut std::io::Cursor::new("ok\nx 1\n")).is_err());
    }

    #[test]
    fn close_names_by_edit_distance() {
        let names = ["worker", "work", "fib", "leaf", "main", "on_signal"];
        assert_eq!(close_names("wrok", names, 3), ["work"]);
        assert_eq!(close_names("wrok*", names, 3), ["work", "worker"]);
        assert_eq!(close_names("fibb*", names, 3), ["fib"]);
        assert!(close_names("zzzzzz", names, 3).is_empty());
        assert!(close_names("*", names, 3).is_empty());
    }

    #[test]
    fn bounded_distance_is_exact_within_its_limit() {
        fn full(a: &[char], b: &[char]) -> usize {
            let mut prev: Vec<usize> = (0..=b.len()).collect();
            for (i, ca) in a.iter().enumerate() {
                let mut cur = vec![i + 1; b.len() + 1];
                for (j, cb) in b.iter().enumerate() {
                    cur[j + 1] = (prev[j] + usize::from(ca != cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
                }
                prev = cur;
            }
            prev[b.len()]
        }
        let words = ["", "a", "work", "wrok", "worker", "kitten", "sitting", "flaw", "lawn", "on_signal", "xxxxxxxxxx"];
        for a in words {
            for b in words {
                let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
                for limit in 0..6 {
                    assert_eq!(distance(&a, &b, limit), full(&a, &b).min(limit + 1), "{a:?} {b:?} {limit}");
                }
            }
        }
    }

    /// Found by textpoke-fuzz (fuzz/corpus/control/long-glob-hints): an
    /// `enable` with a 4 KB glob matching nothing compared it with every
    /// function name in full, holding the agent's thread for seconds
    /// (3.7 s for 5,000 names).
    #[test]
    fn hints_for_long_patterns_are_cheap() {
        fn cpu() -> f64 {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: a valid timespec to fill.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
        }
        let names: Vec<String> = (0..2000).map(|i| format!("function_{i}_{}", "x".repeat(i % 300))).collect();
        let names = || names.iter().map(String::as_str);
        let long = format!("work*{}", "x".repeat(4090));
        let t = cpu();
        assert!(close_names(&long, names(), 5).is_empty());
        let pattern = format!("function_7_{}", "x".repeat(MAX_HINT_PATTERN - 11));
        assert_eq!(close_names(&pattern, names(), 1), [format!("function_117_{}", "x".repeat(117))]);
        // About 2 s unoptimised, most of it for the names much like the
        // 128-character pattern; before, the 4 KB one alone took 3.7 s
        // optimised against 5,000 names of the fuzzer, several times that
        // here.
        assert!(cpu() - t < 10.0, "{} s of CPU", cpu() - t);
    }

    /// Found by textpoke-fuzz (fuzz/corpus/control/reply-cr): a hint
    /// (a function name) ending in `\r` read back without it.
    #[test]
    fn replies_are_one_line_per_field() {
        let r = Reply::error("bad\r\nthing\r").field("hint", "name\r").field("hint", "a\nb\rc");
        assert_eq!(r.error.as_deref(), Some("bad  thing "));
        assert_eq!(r.all("hint").collect::<Vec<_>>(), ["name ", "a b c"]);
        assert_eq!(Reply::read(&mut std::io::Cursor::new(r.to_text())).unwrap(), r);
        let raw = Reply { error: None, fields: vec![("k".into(), "v\n\nw".into())] };
        assert_eq!(raw.to_text(), "ok\nk v  w\n\n", "a field built by hand is still one line");
    }

    #[test]
    fn socket_dir_order() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| OsString::from(v))
        };
        assert_eq!(socket_dir(env(&[(SOCKET_DIR_ENV, "/x"), ("XDG_RUNTIME_DIR", "/r")])), Path::new("/x"));
        assert_eq!(socket_dir(env(&[("XDG_RUNTIME_DIR", "/r")])), Path::new("/r/textpoke"));
        assert_eq!(socket_dir(env(&[])), PathBuf::from(format!("/tmp/textpoke-{}", euid())));
    }
}
