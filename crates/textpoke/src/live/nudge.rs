//! The opt-in nudge: a signal that makes a busy thread check itself (the
//! note's §5.5; the kernel's `klp_send_signals`, its "fake signal").
//!
//! A thread that runs user code and never calls a patched or traced
//! function (a pure loop) cannot be checked from outside (it is running:
//! its stack changes under a reader) and never checks itself: without
//! help its transition only completes by `force`. The kernel sends such
//! tasks a fake signal, which takes them through the kernel's exit path
//! without delivering anything. User space has no such thing: the only way
//! to run code on a busy thread is a real signal, which DESIGN.md rule 9
//! forbids for a thread inside a system call (an interrupted `nanosleep`,
//! `poll`, `epoll_wait` or timed futex wait returns `EINTR` whatever
//! `SA_RESTART` says). So the nudge is off unless asked for
//! ([`Patcher::set_nudge`](super::Patcher::set_nudge), `textpoke patch
//! --nudge`), and it is sent only to threads that look like they run user
//! code.
//!
//! # Algorithm
//!
//! Run by the driver (`Patcher::wait`) once running threads have been
//! pending for the configured delay, then at most once per delay:
//!
//! 1. the threads of `/proc/self/task` not at the transition's target,
//!    other than the driver;
//! 2. for each, `/proc/self/task/TID/syscall` must say `running` (not
//!    blocked in a system call, nor in the kernel otherwise), and
//!    `/proc/self/task/TID/status` must show the nudge signal unblocked
//!    (a blocked one would stay pending, and be delivered later — by a
//!    `sigsuspend` or `ppoll` that unblocks it, say, which would return
//!    `EINTR`);
//! 3. `tgkill` with the nudge signal, a real-time signal nobody handled
//!    when it was installed, below the rendezvous signal (nothing is sent
//!    once the program has installed a handler of its own for it).
//!
//! The handler (`SA_RESTART`, asynchronous signals blocked, `errno` kept)
//! runs the checkpoint self-check (`enter::checkpoint`) from the
//! interrupted registers — the exact PC, stack and frame pointers, so the
//! unwind is as reliable as a stub's — and switches the thread if none of
//! the patch's functions, in the version it may not keep, is on its stack.
//! A thread interrupted inside textpoke's own live-patching code (its
//! recursion guard raised) does nothing. Nothing else changes: the thread
//! returns to where it was.
//!
//! # The remaining race
//!
//! Step 2 reads a state that can change before step 3's signal arrives.
//! `running` is the kernel's `TASK_RUNNING`: on a CPU or runnable, in user
//! mode or in a system call that has not gone to sleep. A thread that,
//! between the read and the signal (microseconds), enters a system call
//! and sleeps there, or is inside a long one that checks for signals, has
//! that call interrupted: restarted transparently when the call and
//! `SA_RESTART` allow (`read`, `write`, untimed futex waits…), but
//! `EINTR` or a short count otherwise. Nothing in user space closes that
//! window (the same one as the grace periods' signal fallback,
//! `trace/grace.rs`). The handler counts the interruptions it can see (it
//! returns right after a `syscall` instruction with `-EINTR` in `rax`):
//! [`Patcher::nudges`](super::Patcher::nudges). So the nudge is for a
//! transition that would otherwise need `force`; a thread that is mostly
//! blocked is checked from outside and never nudged.

use super::enter;
use super::stack::Start;
use super::state::{self, View};
use crate::sys::{mem, signals, threads};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How many nudges were sent, and how many of them the handler saw
/// interrupt a system call (`EINTR` returned to the program).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NudgeStats {
    /// Signals sent.
    pub sent: u64,
    /// Handlers that ran right after an interrupted system call.
    pub interrupted: u64,
}

// [`NudgeStats`]' counters, Relaxed: statistics, publishing nothing.
static SENT: AtomicU64 = AtomicU64::new(0);
static INTERRUPTED: AtomicU64 = AtomicU64::new(0);

/// The driver's nudge schedule (`None`: no nudging, the default).
static SCHEDULE: Mutex<Option<Schedule>> = Mutex::new(None);

#[derive(Debug, Clone, Copy)]
struct Schedule {
    /// How long running threads must have been pending first, and the
    /// least time between two rounds.
    after: Duration,
    last: Option<Instant>,
}

impl super::Patcher {
    /// Opts in to the nudge (module `live::nudge`; the kernel's fake
    /// signal): while a transition is pending with threads running user
    /// code for at least `after`, every `after` those threads are sent a
    /// signal whose handler checks the thread's stack and switches it if
    /// it can — a thread in a pure loop then switches without `force`.
    /// Only threads `/proc/self/task/TID/syscall` shows running are
    /// signalled, never one blocked in a system call; one that enters a
    /// system call in the microseconds between that look and the signal's
    /// arrival may see it fail with `EINTR` (counted in
    /// [`nudges`](Self::nudges)): DESIGN.md rule 9's one exception, hence
    /// opt-in. `None` turns it off.
    pub fn set_nudge(&self, after: Option<Duration>) {
        *SCHEDULE.lock().unwrap_or_else(|e| e.into_inner()) = after.map(|after| Schedule { after, last: None });
    }

    /// The nudges sent so far in this process, and the system calls they
    /// were seen to interrupt.
    pub fn nudges(&self) -> NudgeStats {
        NudgeStats { sent: SENT.load(Ordering::Relaxed), interrupted: INTERRUPTED.load(Ordering::Relaxed) }
    }
}

/// Called by the driver after each round that left the transition
/// pending: nudges the pending running threads when nudging is on and
/// `running_since` (when running threads began to be pending; `None`:
/// there are none) and the last round are at least its delay ago.
pub(super) fn tick(running_since: Option<Instant>) {
    let mut schedule = SCHEDULE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = schedule.as_mut() else { return };
    let due = |t: Option<Instant>| t.is_none_or(|t| t.elapsed() >= s.after);
    if running_since.is_none() || !due(running_since) || !due(s.last) {
        return;
    }
    s.last = Some(Instant::now());
    drop(schedule);
    nudge_pending();
}

/// The nudge signal, installed once; `None` if no signal is free.
fn signal() -> Option<i32> {
    static SIG: OnceLock<Option<i32>> = OnceLock::new();
    *SIG.get_or_init(|| {
        let taken = crate::sync::rendezvous::rendezvous_signal();
        let free = |s: i32| signals::action(s).sa_sigaction == libc::SIG_DFL;
        let sig = ((libc::SIGRTMIN() + 4)..taken).rev().find(|&s| free(s))?;
        signals::install(sig, on_nudge, libc::SA_RESTART).ok()?;
        Some(sig)
    })
}

/// Steps 1–3 of the module docs.
fn nudge_pending() {
    let t = View::load();
    if !t.active || !t.armed {
        return;
    }
    let Some(sig) = signal() else { return };
    if signals::action(sig).sa_sigaction != on_nudge as *const () as usize {
        return; // the program took the number since: its handler is not ours to run
    }
    let me = threads::gettid();
    let mut tids = Vec::new();
    let _ = threads::for_each_tid(|tid| tids.push(tid));
    for tid in tids {
        let at_target = state::find(tid).is_some_and(|r| t.effective(r.word.load(Ordering::Acquire)) == t.target);
        if tid == me || at_target || !runs_user_code(tid) || blocks(tid, sig) {
            continue;
        }
        if threads::signal_thread(tid, sig, 0).is_ok() {
            SENT.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Whether `/proc/self/task/TID/syscall` says `running`.
fn runs_user_code(tid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).is_ok_and(|s| s.trim() == "running")
}

/// Whether thread `tid` blocks `sig` (or cannot be asked: it is gone).
fn blocks(tid: i32, sig: i32) -> bool {
    threads::blocked_mask(tid).is_none_or(|m| m & (1u64 << (sig - 1)) != 0)
}

/// The handler (module docs). Async-signal-safe: no allocation, no lock.
extern "C" fn on_nudge(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let errno = threads::errno();
    // SAFETY: with SA_SIGINFO the kernel passes the interrupted context.
    let g = unsafe { &(*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
    let reg = |r: libc::c_int| g[r as usize] as usize;
    let pc = reg(libc::REG_RIP);
    if g[libc::REG_RAX as usize] == -i64::from(libc::EINTR) {
        let mut insn = [0u8; 2];
        if mem::read_memory(pc.wrapping_sub(2), &mut insn) == 2 && insn == [0x0f, 0x05] {
            INTERRUPTED.fetch_add(1, Ordering::Relaxed);
        }
    }
    let start = Start { pc, sp: reg(libc::REG_RSP), bp: Some(reg(libc::REG_RBP)), exact: true };
    crate::trace::lp_guarded(|nested| {
        if !nested {
            enter::checkpoint(start, None);
        }
    });
    threads::set_errno(errno);
}
