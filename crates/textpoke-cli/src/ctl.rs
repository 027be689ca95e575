//! `textpoke ctl PID status|enable GLOB|disable GLOB`: talks to the agent
//! of a program running under `textpoke record`, through its control
//! socket ([`textpoke_control`]), to see and change what it traces while
//! its threads run.
//!
//! The socket is looked for where the agent put it: the socket directory
//! computed from the program's own environment (`/proc/PID/environ`:
//! `TEXTPOKE_SOCKET_DIR`, `XDG_RUNTIME_DIR`), then from this command's.
//! Before connecting, the socket and its directory must belong to the user
//! running `ctl` and be closed to others; anything else is refused.

use crate::cmdutil::{eprint_line, CliError};
use crate::record::AGENT_FILE_NAME;
use std::ffi::OsString;
use std::io::{BufReader, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use textpoke_analysis::escape;
use textpoke_control::{self as control, Reply, Request};

#[derive(clap::Args)]
pub struct Args {
    /// The process id of a program running under `textpoke record`
    pid: i32,
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Show what the program traces and has recorded
    Status,
    /// Also trace the functions matching GLOB (patches the running program)
    Enable {
        /// A glob over function names, e.g. 'work*' (quote it for the shell)
        glob: String,
    },
    /// Stop tracing the functions matching GLOB (patches the running program)
    Disable {
        /// A glob over function names; '*' stops tracing everything
        glob: String,
    },
}

/// The socket directories to look in for `pid`, most likely first.
fn socket_dirs(pid: i32) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(bytes) = std::fs::read(format!("/proc/{pid}/environ")) {
        let vars: Vec<(Vec<u8>, Vec<u8>)> = bytes
            .split(|&b| b == 0)
            .filter_map(|kv| {
                let i = kv.iter().position(|&b| b == b'=')?;
                Some((kv[..i].to_vec(), kv[i + 1..].to_vec()))
            })
            .collect();
        dirs.push(control::socket_dir(|k| {
            vars.iter().find(|(n, _)| n == k.as_bytes()).map(|(_, v)| OsString::from_vec(v.clone()))
        }));
    }
    dirs.push(control::default_socket_dir());
    dirs.dedup();
    dirs
}

fn process_name(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim_end().to_owned())
}

/// Connects to the agent of `pid`.
fn connect(pid: i32) -> Result<UnixStream, CliError> {
    if pid <= 0 {
        return Err(CliError::new(2, format!("{pid} is not a process id")));
    }
    let Some(name) = process_name(pid) else {
        return Err(CliError::new(1, format!("no process {pid}")));
    };
    let dirs = socket_dirs(pid);
    for dir in &dirs {
        let path = control::socket_path(dir, pid);
        if std::fs::symlink_metadata(&path).is_err() {
            continue;
        }
        control::check_socket(&path).map_err(|e| CliError::new(1, e.to_string()))?;
        return match UnixStream::connect(&path) {
            Ok(s) => Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err(CliError::new(
                1,
                format!("no agent listens on {} (process {pid} ({name}) exec'd or is exiting)", path.display()),
            )),
            Err(e) => Err(CliError::new(1, format!("cannot connect to {}: {e}", path.display()))),
        };
    }
    let shown: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    let loaded = std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|m| maps_have_agent(&m));
    if loaded {
        return Err(CliError::new(
            1,
            format!(
                "process {pid} ({name}) has the textpoke agent but no control socket in {}: it found nothing to \
                 trace, or could not make the socket (see the program's stderr)",
                shown.join(" or ")
            ),
        ));
    }
    Err(CliError::new(
        1,
        format!(
            "process {pid} ({name}) is not running under `textpoke record`: no textpoke agent, no control socket in {}",
            shown.join(" or ")
        ),
    ))
}

/// Whether a `/proc/PID/maps` text maps the agent: a mapping whose file's
/// name is exactly [`AGENT_FILE_NAME`]. Not a substring of the line, so
/// that a program that maps `libtextpoke_agent.so.bak`, a directory named
/// after the agent, or any file whose name merely contains it is not taken
/// for one running under `textpoke record`.
fn maps_have_agent(maps: &str) -> bool {
    maps.lines().filter_map(mapped_path).any(|path| path.rsplit('/').next() == Some(AGENT_FILE_NAME))
}

/// The path of the file a `/proc/PID/maps` line maps, if it maps one: the
/// sixth field (`address perms offset dev inode path`), which runs to the
/// end of the line and may hold spaces; the kernel appends ` (deleted)`
/// when the file was removed or replaced since (a rebuilt agent).
fn mapped_path(line: &str) -> Option<&str> {
    let mut rest = line;
    for _ in 0..5 {
        rest = rest.trim_start_matches(' ');
        rest = &rest[rest.find(' ')?..];
    }
    let path = rest.trim_start_matches(' ');
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    // Anonymous memory has no path, `[heap]` and the like are no files.
    path.starts_with('/').then_some(path)
}

fn ask(pid: i32, req: &Request) -> Result<Reply, CliError> {
    let stream = connect(pid)?;
    let io = |e: std::io::Error| CliError::new(1, format!("talking to the agent of {pid}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(io)?;
    stream.set_write_timeout(Some(Duration::from_secs(5))).map_err(io)?;
    (&stream).write_all(req.to_line().as_bytes()).map_err(io)?;
    Reply::read(&mut BufReader::new(&stream)).map_err(|e| CliError::new(1, format!("agent of {pid}: {e}")))
}

/// The status for people. Every value comes from the program (its name,
/// its directory, the rules it was given) and is escaped ([`escape`]).
fn status_text(r: &Reply) -> String {
    let get = |k: &str| escape(r.get(k).unwrap_or("?"));
    let counts = if get("mode") == "count" {
        format!("calls      {} counted", get("calls"))
    } else {
        format!("calls      {} counted\nevents     {} written, {} lost", get("calls"), get("events"), get("dropped"))
    };
    format!(
        "pid        {} ({})\nstate      {} ({} mode)\ndir        {}\nfunctions  {} traced of {}\n\
         sites      {} traced, {} recorded inline\n{counts}\nrules      {}\n",
        get("pid"),
        get("process"),
        get("state"),
        get("mode"),
        get("dir"),
        get("traced"),
        get("functions"),
        get("sites"),
        get("inline"),
        r.all("rule").map(escape).collect::<Vec<_>>().join(" ")
    )
}

/// A glob must fit in one request line.
fn check_glob(glob: &str) -> Result<(), CliError> {
    if glob.contains(['\n', '\r']) {
        return Err(CliError::new(2, format!("the glob {glob:?} holds a line break; a request is one line")));
    }
    let most = control::MAX_REQUEST_LINE - "disable ".len();
    if glob.len() > most {
        return Err(CliError::new(2, format!("the glob is {} bytes long; the agent takes at most {most}", glob.len())));
    }
    Ok(())
}

pub fn run(args: &Args) -> ExitCode {
    let req = match &args.action {
        Action::Status => Request::Status,
        Action::Enable { glob } => Request::Enable(glob.clone()),
        Action::Disable { glob } => Request::Disable(glob.clone()),
    };
    if let Request::Enable(glob) | Request::Disable(glob) = &req {
        if let Err(e) = check_glob(glob) {
            return e.report("textpoke ctl");
        }
    }
    let reply = match ask(args.pid, &req) {
        Ok(r) => r,
        Err(e) => return e.report("textpoke ctl"),
    };
    if let Some(msg) = &reply.error {
        let hints: Vec<&str> = reply.all("hint").collect();
        let hint = if hints.is_empty() { String::new() } else { format!("; did you mean: {}", hints.join(", ")) };
        eprint_line(&format!("textpoke ctl: {msg}{hint}"));
        return ExitCode::FAILURE;
    }
    let text = match req {
        Request::Status => status_text(&reply),
        _ => {
            let traced = escape(reply.get("traced").unwrap_or("?"));
            let plural = if traced == "1" { "" } else { "s" };
            format!("{traced} function{plural} traced of {}\n", escape(reply.get("functions").unwrap_or("?")))
        }
    };
    // A closed stdout (`| head`) is not an error of the request.
    let _ = std::io::stdout().write_all(text.as_bytes());
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIBC: &str = "7f0000000000-7f0000001000 r-xp 00000000 08:01 1234        /usr/lib/x86_64-linux-gnu/libc.so.6";

    fn line(path: &str) -> String {
        format!("7f1000000000-7f1000002000 r--p 00000000 fd:00 98765                      {path}")
    }

    #[test]
    fn globs_must_fit_one_line() {
        assert!(check_glob("work*").is_ok());
        assert!(check_glob(&"x".repeat(control::MAX_REQUEST_LINE - 8)).is_ok());
        assert!(check_glob(&"x".repeat(control::MAX_REQUEST_LINE - 7)).is_err());
        assert!(check_glob("a\nstatus").is_err());
        assert!(check_glob("a\r").is_err());
    }

    #[test]
    fn status_values_from_the_program_are_escaped() {
        let mut r = Reply::ok();
        for (k, v) in [
            ("pid", "42"),
            ("process", "p\x1b[2J"),
            ("dir", "/tmp/t\r\x07"),
            ("rule", "+work*"),
            ("rule", "-a\u{202e}b"),
        ] {
            r.fields.push((k.into(), v.into()));
        }
        let text = status_text(&r);
        assert!(!text.chars().any(|c| (c.is_control() && c != '\n') || c == '\u{202e}'), "{text:?}");
        assert!(text.contains("pid        42 (p\\e[2J)\n"), "{text}");
        assert!(text.contains("dir        /tmp/t\\r\\x07\n"), "{text}");
        assert!(text.contains("rules      +work* -a\\u{202e}b\n"), "{text}");
    }

    #[test]
    fn mapped_paths_are_the_sixth_field() {
        assert_eq!(mapped_path(LIBC), Some("/usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert_eq!(mapped_path(&line("/a dir/with spaces.so")), Some("/a dir/with spaces.so"));
        assert_eq!(mapped_path(&line("/t/libtextpoke_agent.so (deleted)")), Some("/t/libtextpoke_agent.so"));
        assert_eq!(mapped_path("7ffd0000-7ffd1000 rw-p 00000000 00:00 0                          [stack]"), None);
        assert_eq!(mapped_path("7f2000000000-7f2000001000 rw-p 00000000 00:00 0 "), None);
        assert_eq!(mapped_path("7f2000000000-7f2000001000 rw-p 00000000 00:00 0"), None);
        assert_eq!(mapped_path(""), None);
    }

    #[test]
    fn only_the_agents_own_file_name_counts() {
        let with = |paths: &[&str]| {
            let mut maps = String::from(LIBC);
            for p in paths {
                maps.push('\n');
                maps.push_str(&line(p));
            }
            maps.push('\n');
            maps_have_agent(&maps)
        };
        assert!(with(&["/build/target/debug/deps/libtextpoke_agent.so"]));
        assert!(with(&["/opt/lib/textpoke/libtextpoke_agent.so (deleted)"]));
        assert!(with(&["/dir with space/libtextpoke_agent.so"]));
        assert!(!with(&[]));
        assert!(!with(&["/home/u/libtextpoke_agent.so.bak"]));
        assert!(!with(&["/home/u/notes-about-libtextpoke_agent.txt"]));
        assert!(!with(&["/home/u/libtextpoke_agent.so/data.bin"]));
        assert!(!with(&["/home/u/my_libtextpoke_agent.so"]));
    }
}
