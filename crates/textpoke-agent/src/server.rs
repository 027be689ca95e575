//! The agent thread: serves the control socket, rescans loaded objects
//! when the loader's counters move, stops the recorder when a stop signal
//! arrives or a program thread is in `_exit`, and stops tracing when
//! `textpoke record` is gone (see the crate docs, steps 3, 6 and 7,
//! `interpose`, `front`).
//!
//! This file starts the thread and runs its loop; each job the loop does
//! has a file of its own:
//!
//! | file | job |
//! |---|---|
//! | `server/wake.rs` | the wake pipe, written by signal handlers and wrappers |
//! | `server/socket.rs` | the socket file and its listener; stale sockets of dead processes |
//! | `server/commands.rs` | answering `status`, `enable`, `disable` (the `patch-*` requests: `patch.rs`) |
//! | `server/loader.rs` | following `dlopen`/`dlclose` through the loader's counters |
//! | `server/stop_signals.rs` | `SIGINT`/`SIGTERM`/`SIGHUP`: a complete trace, then the signal |
//! | `server/exit.rs` | the `_exit` handshake |
//!
//! and the connections are served by `clients`, the front process watched
//! by `front`.
//!
//! # The loop
//!
//! One thread, one `poll` over everything it waits for: the wake pipe
//! (written by the stop-signal handler, the `_exit` wrapper and the
//! `dlopen` wrapper), the listening socket, the pidfd of `textpoke record`,
//! and every control connection (see `clients`). It never blocks anywhere
//! else, so a client that connects and says nothing, or half a line,
//! delays neither other clients nor a thread waiting in `_exit`. Each
//! round handles, in this order: an `_exit` waiting for the trace, a stop
//! signal, the end of `textpoke record`, the connections, a rescan of the
//! loaded objects. `poll` returns at least every tick (50 ms; every
//! millisecond for a while after a `dlopen`), at once when a connection
//! has a request buffered, and at the connections' deadlines.
//!
//! The descriptors it keeps are the agent's own, checked before every use
//! (see `fds`).
//!
//! # fork
//!
//! Threads do not survive `fork`: in the child, [`after_fork_in_child`]
//! forgets the parent's agent thread and everything it held (each job's
//! own state, the descriptors), and the fork handler starts a new thread
//! when the child records.
//!
//! # Stop
//!
//! [`stop`] (the agent's shutdown, step 8) ends the loop and joins the
//! thread: its handle is kept in [`THREAD`]. The loop runs while
//! [`THREAD_PID`] is this process's pid; `stop` clears it, wakes the
//! thread, which finishes its round (at most a tick if it had no wake
//! pipe yet), drops what it holds (descriptors close) and returns. No
//! agent thread starts afterwards, not even for a `dlopen`.

mod commands;
pub(crate) use commands::inline_sites;
pub(crate) mod exit;
pub(crate) mod loader;
pub(crate) mod socket;
pub(crate) mod stop_signals;
mod wake;

use crate::clients::Clients;
use crate::fds::{close_inherited, Fd};
use crate::front;
use crate::{as_agent, getpid, note_once, set_in_agent_thread, AGENT};
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;
use textpoke::sync::ForkLock;
use textpoke_sys::threads::gettid;

/// How often the agent thread wakes without a reason.
const TICK_MS: i32 = 50;

/// The pid whose agent thread runs (threads do not survive fork).
static THREAD_PID: AtomicI32 = AtomicI32::new(0);

/// The agent thread's tid (0 until it runs).
static THREAD_TID: AtomicI32 = AtomicI32::new(0);

/// The agent thread's handle, for [`stop`] to join it. Its lock is taken
/// after the agent's (`AGENT`) when both are, and held across `fork` by
/// the fork handlers.
static THREAD: ForkLock<AgentThread> = ForkLock::new(AgentThread { handle: None, stopped: false });

struct AgentThread {
    handle: Option<JoinHandle<()>>,
    /// [`stop`] ran: no agent thread starts any more.
    stopped: bool,
}

/// Starts the agent thread of this process if it is not running.
pub(crate) fn spawn() {
    let pid = getpid();
    // Held while the thread is made, so that `stop` finds its handle.
    let mut thread = THREAD.lock();
    if thread.stopped || THREAD_PID.swap(pid, Ordering::AcqRel) == pid {
        return;
    }
    let r = std::thread::Builder::new().name("textpoke-agent".into()).spawn(|| {
        as_agent(main_loop);
    });
    match r {
        Ok(h) => thread.handle = Some(h),
        Err(_) => {
            THREAD_PID.store(0, Ordering::Release);
            note_once("cannot start the agent thread: no control socket, libraries loaded later are not traced");
        }
    }
}

/// Ends the agent thread and waits for it (see the module docs, "Stop");
/// no agent thread starts afterwards. On the agent thread itself it only
/// asks (a thread cannot wait for itself). The caller must not hold the
/// agent's lock, which the thread may be waiting for.
pub(crate) fn stop() {
    let handle = {
        let mut thread = THREAD.lock();
        thread.stopped = true;
        // Release pairs with the loop's Acquire load of THREAD_PID.
        THREAD_PID.store(0, Ordering::Release);
        thread.handle.take()
    };
    wake::wake();
    if let Some(h) = handle {
        if h.thread().id() != std::thread::current().id() {
            let _ = h.join();
        }
    }
}

/// Undoes [`stop`]'s "for good": the agent thread may start again (an
/// injected agent attached again, see `attach`).
pub(crate) fn rearm() {
    THREAD.lock().stopped = false;
}

/// Before `fork` (after the agent's lock): [`THREAD`] is consistent in
/// the child.
pub(crate) fn fork_prepare() {
    // SAFETY: released by `fork_parent`, or `after_fork_in_child` in the
    // child, on this thread.
    unsafe { THREAD.raw_lock() };
}

/// After `fork`, in the parent.
pub(crate) fn fork_parent() {
    // SAFETY: locked by `fork_prepare` on this thread.
    unsafe { THREAD.raw_unlock() };
}

/// Whether this process's agent thread runs (async-signal-safe).
fn running() -> bool {
    THREAD_PID.load(Ordering::Acquire) == getpid()
}

/// Whether `tid` is the agent thread's (async-signal-safe).
fn is_agent_thread(tid: i32) -> bool {
    THREAD_TID.load(Ordering::Acquire) == tid
}

fn block_async_signals() {
    let set = textpoke_sys::signals::set_of(&[
        libc::SIGHUP,
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGTERM,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGCHLD,
        libc::SIGPIPE,
        libc::SIGWINCH,
        libc::SIGIO,
        libc::SIGURG,
        // Not the CPU-time signals (`signals::CPU_TIME`): blocked here, the
        // kernel would give them to another thread, perhaps one asleep.
        libc::SIGTSTP,
        libc::SIGTTIN,
        libc::SIGTTOU,
    ]);
    textpoke_sys::signals::set_mask(libc::SIG_BLOCK, &set);
}

fn main_loop() {
    set_in_agent_thread();
    THREAD_TID.store(gettid(), Ordering::Release);
    block_async_signals();
    let front = AGENT.lock().as_ref().and_then(|a| a.config.front);
    let mut state = LoopState {
        me: getpid(),
        wake: wake::WakePipe::new(),
        socket: socket::ControlSocket::default(),
        clients: Clients::default(),
        front: front.map(front::Watch::start),
        loader: loader::Follower::default(),
        session: crate::attach::take_inherited(),
    };
    while THREAD_PID.load(Ordering::Acquire) == state.me {
        state.round();
    }
    wake::forget(); // the pipe closes with `state`
}

/// What the agent thread holds between rounds.
struct LoopState {
    me: i32,
    wake: Option<wake::WakePipe>,
    socket: socket::ControlSocket,
    clients: Clients,
    /// `textpoke record`, while it runs.
    front: Option<front::Watch>,
    loader: loader::Follower,
    /// In a child forked during an attach session: the session socket,
    /// whose end ends tracing here (see `attach::fork_child`).
    session: Option<Fd>,
}

/// Appends `p` to `fds` if there is one; its index.
fn push_poll(fds: &mut Vec<libc::pollfd>, p: Option<libc::pollfd>) -> Option<usize> {
    let p = p?;
    fds.push(p);
    Some(fds.len() - 1)
}

fn poll_in(fd: &Fd) -> Option<libc::pollfd> {
    fd.ours().then_some(libc::pollfd { fd: fd.raw(), events: libc::POLLIN, revents: 0 })
}

impl LoopState {
    /// One round of the loop (see the module docs).
    fn round(&mut self) {
        self.socket.ensure();
        let mut fds = Vec::with_capacity(3 + self.clients.len());
        push_poll(&mut fds, self.wake.as_ref().and_then(|w| poll_in(&w.read)));
        let listen_at = push_poll(&mut fds, self.socket.poll_fd());
        let front_at = push_poll(&mut fds, self.front.as_ref().and_then(front::Watch::poll_fd));
        // No events asked: only its end (POLLHUP, POLLERR) wakes us; the
        // parent's session thread reads what the CLI sends.
        let session_at = push_poll(
            &mut fds,
            self.session.as_ref().filter(|f| f.ours()).map(|f| libc::pollfd { fd: f.raw(), events: 0, revents: 0 }),
        );
        let clients_at = fds.len();
        self.clients.poll_fds(&mut fds);
        let timeout = self.timeout_ms();
        // SAFETY: `fds` is a valid array of its length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        let revents = |at: Option<usize>| at.map_or(0, |i| fds[i].revents);
        // The urgent first: a program thread waits in `_exit`; a signal
        // is to kill the process.
        exit::act_on_request();
        stop_signals::act_on_pending();
        if self.wake.as_ref().is_some_and(|w| !w.drain()) {
            self.wake = None; // the program took it over: no more waking
            wake::forget();
        }
        if self.front.as_mut().is_some_and(|w| w.gone(revents(front_at))) {
            self.front = None;
            crate::front_ended();
        }
        if revents(session_at) & (libc::POLLHUP | libc::POLLERR) != 0 {
            self.session = None;
            crate::attach::inherited_session_ended();
        }
        self.clients.note_polled(&fds[clients_at..]);
        let now = Instant::now();
        self.socket.accept(revents(listen_at), &mut self.clients, now);
        if self.clients.len() > 0 {
            self.clients.serve(now, &mut commands::handle);
        }
        self.loader.follow();
    }

    /// How long `poll` may wait, in milliseconds.
    fn timeout_ms(&self) -> i32 {
        // No wait when an `_exit` already asked: in a forked child it may
        // have asked before this thread made its wake pipe (nobody to
        // wake), and waited a whole tick for nothing (50 ms per child).
        if exit::asked() {
            return 0;
        }
        let now = Instant::now();
        let tick = if self.loader.watching(now) { 1 } else { TICK_MS };
        match self.clients.timeout(now) {
            Some(d) => (d.as_nanos().div_ceil(1_000_000) as i32).min(tick),
            None => tick,
        }
    }
}

/// In a forked child: the parent's agent thread, descriptors and socket
/// are not ours.
pub(crate) fn after_fork_in_child() {
    // SAFETY: `fork_prepare` locked it on this thread, the only one here.
    let parents = unsafe { THREAD.get_locked() }.handle.take();
    // The parent's thread does not exist here: its handle is forgotten
    // (joining or detaching it would act on a thread of the parent).
    std::mem::forget(parents);
    // SAFETY: held since `fork_prepare`.
    unsafe { THREAD.raw_unlock() };
    THREAD_PID.store(0, Ordering::Release);
    THREAD_TID.store(0, Ordering::Release);
    exit::after_fork_in_child(); // a parent thread's _exit
    stop_signals::after_fork_in_child();
    wake::after_fork_in_child();
    socket::after_fork_in_child(); // the parent's
    close_inherited(); // the parent's listener, wake pipe, pidfd, connections
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Phase;
    use std::time::Duration;

    /// The agent thread of an idle agent (this test binary has no
    /// patchable functions: the constructor left the agent idle) ticks
    /// without taking the agent's lock, also while it watches for a
    /// `dlopen` after a nudge; `shutdown` ends it for good. (One test:
    /// the shutdown is for the whole process.)
    #[test]
    fn idle_ticks_take_no_lock_and_shutdown_joins_the_thread() {
        assert!(crate::LOADED.load(Ordering::Acquire), "the constructor ran");
        assert_eq!(AGENT.lock().as_ref().map(|a| a.phase), Some(Phase::Idle));
        spawn();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !wake::is_open() {
            assert!(Instant::now() < deadline, "the agent thread did not start");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(agent_threads(), 1);
        let ticks = Duration::from_millis(6 * TICK_MS as u64);
        let before = AGENT.times_taken();
        std::thread::sleep(ticks);
        loader::nudge(); // a dlopen that loads nothing: 250 ms of 1 ms ticks
        std::thread::sleep(loader::DLOPEN_WATCH + ticks);
        assert_eq!(AGENT.times_taken(), before, "the agent thread took the lock with nothing to do");

        crate::shutdown();
        // Joined: the thread finished its loop (it forgets its wake pipe
        // last) before shutdown returned...
        assert!(!wake::is_open(), "shutdown returned before the agent thread ended");
        assert!(!running());
        // ...and the kernel lets go of it a moment later.
        let deadline = Instant::now() + Duration::from_secs(5);
        while agent_threads() != 0 {
            assert!(Instant::now() < deadline, "the agent thread is still there after shutdown");
            std::thread::sleep(Duration::from_millis(1));
        }
        loader::nudge(); // a dlopen after the shutdown starts nothing
        spawn();
        std::thread::sleep(ticks);
        assert_eq!(agent_threads(), 0, "an agent thread started after shutdown");
        assert!(crate::ENDED.load(Ordering::Acquire), "no recording starts after shutdown");
    }

    /// How many threads of this process are named `textpoke-agent`.
    fn agent_threads() -> usize {
        let tasks = std::fs::read_dir("/proc/self/task").unwrap();
        tasks
            .flatten()
            .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == "textpoke-agent"))
            .count()
    }
}
