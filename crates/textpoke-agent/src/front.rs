//! Watching `textpoke record`, the front process: when it is gone, the
//! agent stops tracing and finishes the trace, and the program runs on.
//!
//! # Why
//!
//! `textpoke record` waits for the program, forwards signals to it and
//! sums the trace up. Killed (`SIGKILL`, a crash, a closed terminal that
//! took it alone), it used to leave the program recording with nobody to
//! stop it: a long-running program wrote gigabytes a minute until the disk
//! was full. The program must not notice the tracer, so it is not killed
//! with its front (no `PR_SET_PDEATHSIG`): only the tracing ends.
//!
//! # How
//!
//! `textpoke record` passes its pid and start time in the environment
//! (`TEXTPOKE_RECORD_PID`, see [`textpoke_control`], "The front
//! process"). The agent thread opens a pidfd of that process
//! (`pidfd_open`) and polls it along with its other descriptors: it
//! becomes readable when the process ends, which wakes the agent thread at
//! once. Then `crate::front_ended` unregisters the op (the sites are
//! unpatched) and stops the recorder the way an exit does, so the trace
//! directory is complete and stops growing.
//!
//! Nothing is inherited from `textpoke record` but that variable: no
//! descriptor enters the program's table, so neither the program nor the
//! programs it starts can hold `textpoke record` "alive" in the agent's
//! eyes, find a stray descriptor, or pass one on. The pidfd is the
//! agent's own, high and close-on-exec like its other descriptors (see
//! `fds`); a forked child's agent, or that of a program the traced one
//! executes, opens its own from the inherited variable. So every traced
//! process under one `textpoke record` stops tracing when it is gone,
//! including a child that outlives the program (a daemon), which would
//! otherwise record on after `textpoke record` returned.
//!
//! # Is it the same process?
//!
//! A pid alone may be reused once its process is gone. The pidfd is
//! opened first, then `/proc/PID/stat` is read: if it still shows the
//! start time `textpoke record` passed, that process was alive all along
//! and the pidfd is its own. A zombie counts as gone (it was killed and
//! is waiting for its parent to reap it).
//!
//! Without `pidfd_open` (Linux before 5.3, or a seccomp filter refusing
//! it), or once the program closed the pidfd, the agent thread reads
//! `/proc/PID/stat` instead, at most once per tick (50 ms).

use crate::fds::Fd;
use std::time::{Duration, Instant};
use textpoke_control::{proc_stat, FrontProcess};
use textpoke_sys::process::{self, pidfd_open};

/// How often the front process is looked at without a pidfd.
const RECHECK: Duration = Duration::from_millis(50);

/// The watch of one front process, on the agent thread.
pub(crate) struct Watch {
    front: FrontProcess,
    /// Readable once the process ended; `None`: look at `/proc` instead.
    pidfd: Option<Fd>,
    /// It was gone already when the watch started.
    gone_at_start: bool,
    /// The next `/proc` look without a pidfd.
    next_check: Instant,
}

impl Watch {
    /// Starts watching `front`.
    pub fn start(front: FrontProcess) -> Watch {
        let (pidfd, gone) = match pidfd_open(front.pid) {
            Ok(fd) => (Fd::adopt(fd), false),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => (None, true),
            Err(_) => (None, false), // no pidfds here: `/proc` it is
        };
        // After the pidfd is open (see the module docs).
        let gone = gone || proc_says_gone(front);
        Watch { front, pidfd, gone_at_start: gone, next_check: Instant::now() }
    }

    /// The `pollfd` to add to the agent thread's `poll`, if any.
    pub fn poll_fd(&self) -> Option<libc::pollfd> {
        let fd = self.pidfd.as_ref().filter(|fd| fd.ours())?;
        Some(libc::pollfd { fd: fd.raw(), events: libc::POLLIN, revents: 0 })
    }

    /// After `poll` (`revents`: what it said of [`Watch::poll_fd`]'s
    /// entry, 0 if none): whether the front process is gone.
    pub fn gone(&mut self, revents: i16) -> bool {
        if self.gone_at_start {
            return true;
        }
        match &self.pidfd {
            Some(fd) if fd.ours() => return revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0,
            Some(_) => self.pidfd = None, // the program closed it: forget it
            None => {}
        }
        let now = Instant::now();
        if now < self.next_check {
            return false;
        }
        self.next_check = now + RECHECK;
        proc_says_gone(self.front)
    }
}

/// Whether `/proc` (or `kill`, where `/proc` cannot be read) shows that
/// `front` is gone: no such process, a zombie, or another process with
/// its pid. False when it cannot tell. Also used at load, so that a
/// program started (or executed) after `textpoke record` died never
/// starts recording.
pub(crate) fn proc_says_gone(front: FrontProcess) -> bool {
    match proc_stat(front.pid) {
        Some(st) => matches!(st.state, 'Z' | 'X') || (front.start != 0 && st.start != front.start),
        None => !exists(front.pid),
    }
}

/// `kill(pid, 0)`: whether the pid names a process (possibly a zombie).
pub(crate) fn exists(pid: i32) -> bool {
    match process::kill_process(pid, 0) {
        Ok(()) => true,
        Err(e) => e.raw_os_error() != Some(libc::ESRCH),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn child() -> std::process::Child {
        std::process::Command::new("sleep").arg("30").spawn().unwrap()
    }

    #[test]
    fn a_running_process_is_watched_until_it_ends() {
        let mut c = child();
        let front = FrontProcess { pid: c.id() as i32, start: proc_stat(c.id() as i32).unwrap().start };
        let mut w = Watch::start(front);
        let p = w.poll_fd().expect("pidfd_open works on this kernel");
        assert!(!w.gone(0));
        c.kill().unwrap();
        let mut fds = [p];
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 10_000) };
        assert_eq!(n, 1, "the pidfd became readable");
        assert!(w.gone(fds[0].revents));
        c.wait().unwrap();
    }

    #[test]
    fn a_reused_pid_or_a_zombie_is_gone() {
        let mut c = child();
        let pid = c.id() as i32;
        let start = proc_stat(pid).unwrap().start;
        assert!(Watch::start(FrontProcess { pid, start: start + 1 }).gone(0), "another start time");
        assert!(!Watch::start(FrontProcess { pid, start: 0 }).gone(0), "start time unknown: alive");
        c.kill().unwrap();
        // Not reaped yet: a zombie.
        let deadline = Instant::now() + Duration::from_secs(10);
        while proc_stat(pid).is_some_and(|s| s.state != 'Z') {
            assert!(Instant::now() < deadline, "{pid} never became a zombie");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut w = Watch::start(FrontProcess { pid, start });
        assert!(w.gone(0));
        c.wait().unwrap();
        assert!(proc_says_gone(FrontProcess { pid, start }), "reaped: no such process");
    }

    #[test]
    fn without_a_pidfd_proc_is_read() {
        let mut c = child();
        let pid = c.id() as i32;
        let mut w = Watch::start(FrontProcess { pid, start: proc_stat(pid).unwrap().start });
        w.pidfd = None;
        assert!(!w.gone(0));
        c.kill().unwrap();
        c.wait().unwrap();
        w.next_check = Instant::now();
        assert!(w.gone(0));
    }
}
