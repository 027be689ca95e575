//! The control socket's file and listener (the protocol is in
//! [`textpoke_control`], the connections in `clients`).
//!
//! `<socket dir>/<pid>.sock`, mode 0600 in a 0700 directory, made when the
//! agent leaves the idle phase; removed at exit, before an exec (made again
//! if the exec fails), and by the next agent to make its socket in the
//! same directory if this process died without removing it (see
//! [`remove_stale_sockets`]).
//!
//! The listener is polled with the agent thread's other descriptors; when
//! accepting fails for want of descriptors (the program is at its limit),
//! it is left alone for [`ACCEPT_PAUSE`], the connection waiting in the
//! backlog, rather than polled again at once (it would spin).

use crate::clients::Clients;
use crate::fds::Fd;
use crate::{getpid, note_once, AGENT};
use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, Ordering};
use std::time::{Duration, Instant};
use textpoke_control as control;

/// How long the agent thread leaves the listener alone after accepting
/// failed for want of descriptors (the program is at its limit).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// The socket was removed (before an exec, which failed): make it again.
static REBIND: AtomicBool = AtomicBool::new(false);

/// Our socket file (a leaked C string) and the pid it belongs to, to
/// remove at exit and before exec without a lock.
static SOCKET_PATH: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());
static SOCKET_PID: AtomicI32 = AtomicI32::new(0);

/// The agent thread's listener.
#[derive(Default)]
pub(super) struct ControlSocket {
    listener: Option<Fd>,
    /// The socket could not be made: do not try again every tick.
    failed: bool,
    /// Until when not to poll the listener: accepting failed for want of
    /// descriptors (the connection waits in the backlog).
    accept_paused_until: Option<Instant>,
}

impl ControlSocket {
    /// Makes the socket once the agent left the idle phase (again after a
    /// failed exec removed it).
    pub fn ensure(&mut self) {
        if REBIND.swap(false, Ordering::AcqRel) {
            self.listener = None;
        }
        // A tick with nothing to do reads atomics only: the lock is taken
        // for work (binding once, a request, a rescan, a stop), so that a
        // tick never waits for (or delays) a program thread in the dlclose
        // wrapper or a fork.
        if self.listener.is_some() || self.failed || !crate::left_idle() {
            return;
        }
        match bind() {
            Ok(l) => self.listener = Some(l),
            Err(e) => {
                self.failed = true;
                note_once(&format!("no control socket ({e}); textpoke ctl cannot reach this process"));
            }
        }
    }

    /// The listener's `pollfd`, unless there is none or it is paused.
    pub fn poll_fd(&self) -> Option<libc::pollfd> {
        let listening = self.accept_paused_until.is_none_or(|t| Instant::now() >= t);
        self.listener.as_ref().filter(|_| listening).and_then(super::poll_in)
    }

    /// Accepts the new connections into `clients` (`revents`: what `poll`
    /// said of [`ControlSocket::poll_fd`]'s entry, 0 if none).
    pub fn accept(&mut self, revents: i16, clients: &mut Clients, now: Instant) {
        if let Some(l) = &self.listener {
            if !l.ours() {
                self.listener = None; // the program closed it: no more control
            } else if revents & libc::POLLIN != 0 && !clients.accept(l, now) {
                self.accept_paused_until = Some(now + ACCEPT_PAUSE);
            }
        }
    }
}

/// Creates `<dir>/<pid>.sock` (0600, in a 0700 directory), after
/// removing the sockets that dead processes left there.
fn bind() -> Result<Fd, String> {
    let dir = AGENT.lock().as_ref().map(|a| a.socket_dir.clone()).ok_or("agent not loaded")?;
    control::prepare_private_dir(&dir).map_err(|e| e.to_string())?;
    remove_stale_sockets(&dir);
    let path = control::socket_path(&dir, getpid());
    if let Ok(m) = std::fs::symlink_metadata(&path) {
        if !m.file_type().is_socket() {
            return Err(format!("{} exists and is not a socket", path.display()));
        }
        let _ = std::fs::remove_file(&path); // stale: a process of an earlier pid
    }
    let l = UnixListener::bind(&path).map_err(|e| format!("bind {}: {e}", path.display()))?;
    control::restrict_socket(&path).map_err(|e| e.to_string())?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    let fd = Fd::adopt(OwnedFd::from(l)).ok_or("cannot keep the socket")?;
    let c = CString::new(path.into_os_string().into_vec()).map_err(|e| e.to_string())?;
    SOCKET_PID.store(getpid(), Ordering::Release);
    SOCKET_PATH.store(c.into_raw(), Ordering::Release);
    register_unlink_at_exit();
    Ok(fd)
}

/// Removes from `dir` the sockets of processes that are gone: entries
/// named `<pid>.sock` (the pid written as the agent writes it) that are
/// sockets themselves (a symbolic link is never followed, nor removed),
/// owned by the effective uid, whose pid does not exist, and on which a
/// connection is refused. The last check keeps the socket of a live agent
/// whose pid this process cannot see (another pid namespace sharing the
/// directory); it also keeps a socket whose pid was reused by a process
/// that listens on it. The directory is private (0700, checked), so
/// nobody else can swap an entry between the checks and the removal.
pub(crate) fn remove_stale_sockets(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let me = getpid();
    for entry in entries.flatten() {
        let Some(pid) = socket_pid(&entry.file_name()) else { continue };
        let path = entry.path();
        if pid != me && is_stale(&path, pid) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The pid of a socket file name `<pid>.sock`, written without sign or
/// leading zeros.
fn socket_pid(name: &OsStr) -> Option<i32> {
    let digits = name.as_bytes().strip_suffix(b".sock")?;
    let pid: i32 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    (pid > 0 && pid.to_string().as_bytes() == digits).then_some(pid)
}

fn is_stale(path: &Path, pid: i32) -> bool {
    let Ok(m) = std::fs::symlink_metadata(path) else { return false };
    // SAFETY: no preconditions.
    let uid = unsafe { libc::geteuid() };
    m.file_type().is_socket() && m.uid() == uid && !crate::front::exists(pid) && connection_refused(path)
}

/// Whether connecting to the socket at `path` is refused (nobody listens).
/// The attempt does not block: a live listener with a full backlog counts
/// as listening.
fn connection_refused(path: &Path) -> bool {
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return false;
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    // SAFETY: creates a socket; checked below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: a new descriptor, owned here (closed on drop).
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid, NUL-terminated sockaddr_un of `len` bytes.
    let rc = unsafe { libc::connect(sock.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) };
    rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECONNREFUSED)
}

fn register_unlink_at_exit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    extern "C" fn at_exit() {
        remove_socket();
    }
    ONCE.call_once(|| {
        // SAFETY: an `extern "C"` handler without arguments.
        unsafe { libc::atexit(at_exit) };
    });
}

/// Removes this process's socket file (exit, exec, `_exit`).
pub(crate) fn remove_socket() {
    if SOCKET_PID.load(Ordering::Acquire) != getpid() {
        return; // a vfork child: the socket is the parent's
    }
    let p = SOCKET_PATH.swap(std::ptr::null_mut(), Ordering::AcqRel);
    if !p.is_null() {
        // SAFETY: a NUL-terminated path made by `bind` (leaked, never freed).
        unsafe { libc::unlink(p) };
    }
}

/// This process's socket file, once the agent thread made it.
pub(crate) fn bound_path() -> Option<std::path::PathBuf> {
    if SOCKET_PID.load(Ordering::Acquire) != getpid() {
        return None;
    }
    let p = SOCKET_PATH.load(Ordering::Acquire);
    // SAFETY: a NUL-terminated path made by `bind`, leaked, never freed.
    (!p.is_null()).then(|| std::ffi::OsStr::from_bytes(unsafe { std::ffi::CStr::from_ptr(p) }.to_bytes()).into())
}

/// An exec failed after [`remove_socket`]: make the socket again.
pub(crate) fn exec_failed() {
    REBIND.store(true, Ordering::Release);
}

/// In a forked child: the parent's socket file is the parent's to remove.
pub(super) fn after_fork_in_child() {
    SOCKET_PATH.store(std::ptr::null_mut(), Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    /// The pid of a process that ran and was reaped.
    fn dead_pid() -> i32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        c.wait().unwrap();
        c.id() as i32
    }

    /// A socket file at `path` on which nobody listens.
    fn dead_socket(path: &Path) {
        drop(UnixListener::bind(path).unwrap());
    }

    /// Only the sockets of dead pids on which nobody listens are removed.
    #[test]
    fn stale_sockets_are_removed_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("textpoke-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let sock = |pid: i32| dir.join(format!("{pid}.sock"));
        let stale = sock(dead_pid());
        dead_socket(&stale);
        // SAFETY: no preconditions.
        let alive = sock(unsafe { libc::getppid() });
        dead_socket(&alive);
        let listened = sock(dead_pid());
        let _listener = UnixListener::bind(&listened).unwrap();
        let file = sock(dead_pid());
        std::fs::write(&file, "x").unwrap();
        let elsewhere = dir.join("elsewhere");
        dead_socket(&elsewhere);
        let link = sock(dead_pid());
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let odd: Vec<PathBuf> = ["0001.sock", "+5.sock", "x.sock", ".sock"].iter().map(|n| dir.join(n)).collect();
        for p in &odd {
            dead_socket(p);
        }
        remove_stale_sockets(&dir);
        assert!(std::fs::symlink_metadata(&stale).is_err(), "the dead process's socket is removed");
        for kept in [&alive, &listened, &file, &elsewhere, &link].into_iter().chain(&odd) {
            assert!(std::fs::symlink_metadata(kept).is_ok(), "{} is kept", kept.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
