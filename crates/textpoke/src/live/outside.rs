//! Checking and switching a thread blocked in the kernel, from another
//! thread, without interrupting it (note §6.3; DESIGN rule 9).
//!
//! The kernel checks a sleeping task's stack under `task_call_func`, the
//! task unable to run meanwhile. Here the equivalent is a snapshot proven
//! unchanged:
//!
//! 1. read `/proc/self/task/T/syscall` (not "running": the stack pointer
//!    and PC it stopped at) and `status` (its voluntary and involuntary
//!    context switches); then its word `w0`;
//! 2. copy its stack from that stack pointer to the end of the mapping
//!    holding it, whole (`process_vm_readv` in 1 MiB pieces: never
//!    faults; a short copy means "look again later", never a verdict on
//!    part of the stack), and its shadow stack;
//! 3. unwind from `(pc, sp)` (`rbp` unknown until a frame saved it) over the
//!    copy; if that is not reliable, scan the copy conservatively;
//! 4. read both files again: identical, and still not running, means
//!    the thread did not run in between (waking and blocking again bumps a
//!    context-switch count; a preemption the other);
//! 5. clean: `CAS(word, w0 -> {gen, epoch(w0), target})`. The thread itself
//!    bumps the epoch before entering any version it did not switch to, so
//!    a CAS on a word read before that fails (note §5.4).

use super::enter::Check;
use super::stack::{self, Lookups, Snapshot, Start, Verdict};
use super::state::{self, View};
use std::sync::atomic::Ordering;

/// How a thread is, from its `/proc` files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Sched {
    /// The state letter of `stat`.
    pub state: char,
    pub switches: (u64, u64),
    /// The `syscall` file's line.
    pub syscall: String,
}

impl Sched {
    /// Two files: `status` (state, context switches) and `syscall`.
    pub(super) fn read(tid: i32) -> Option<Sched> {
        let syscall = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).ok()?.trim().to_string();
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
        let state = field("State:")?.chars().next()?;
        let num = |name: &str| -> Option<u64> { field(name)?.parse().ok() };
        let switches = (num("voluntary_ctxt_switches:")?, num("nonvoluntary_ctxt_switches:")?);
        Some(Sched { state, switches, syscall })
    }

    /// Not on a CPU: blocked in the kernel, stopped, or preempted (its
    /// `syscall` file then gives the stack pointer and PC it will resume
    /// at; a check is as sound for it, as long as it does not run).
    pub(super) fn blocked(&self) -> bool {
        self.syscall != "running"
    }

    /// Blocked in the kernel (not runnable), for reports.
    pub(super) fn sleeping(&self) -> bool {
        self.state != 'R' && self.blocked()
    }

    /// `(syscall number or -1, sp, pc)`.
    pub(super) fn regs(&self) -> Option<(i64, usize, usize)> {
        let f: Vec<&str> = self.syscall.split_whitespace().collect();
        let hex = |s: &str| usize::from_str_radix(s.trim_start_matches("0x"), 16).ok();
        let nr: i64 = f.first()?.parse().ok()?;
        let (sp, pc) = (hex(f.get(f.len().checked_sub(2)?)?)?, hex(f.last()?)?);
        Some((nr, sp, pc))
    }
}

/// CLOCK_BOOTTIME now in clock ticks (`USER_HZ`, the unit of a thread's
/// start time in `/proc/self/task/T/stat`), rounded down.
pub(super) fn boot_ticks() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    let ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    ns / (1_000_000_000 / clock_ticks_per_sec())
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as u64
    } else {
        100
    }
}

/// Whether thread `tid` was created after the clock tick `tick` (read by
/// [`boot_ticks`]): its start time (field 22 of its `stat`, the kernel's
/// `start_boottime` in the same ticks, rounded down) is a later tick.
/// A later tick means a later instant; a thread started within the same
/// tick counts as older (the cautious side), and so does one whose file
/// cannot be read.
pub(super) fn born_after(tid: i32, tick: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")) else { return false };
    // After the name (which may hold spaces and parentheses): field 3 on.
    let Some((_, rest)) = stat.rsplit_once(')') else { return false };
    let start: Option<u64> = rest.split_whitespace().nth(22 - 3).and_then(|f| f.parse().ok());
    start.is_some_and(|s| s > tick)
}

/// The thread's name (`comm`).
pub(super) fn comm(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// The end of the mapping holding `addr`.
pub(super) fn mapping_end(maps: &crate::sys::maps::Maps, addr: usize) -> Option<usize> {
    maps.find(addr).map(|m| m.end)
}

/// What an outside check concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outside {
    /// At the target now (switched here, or already).
    Switched,
    /// Running: it switches itself.
    Running,
    /// Holds a frame of the versions it may not leave (a hit), or its
    /// snapshot changed, or its stack could not be read.
    Pending,
}

/// Checks blocked thread `tid` and switches it if its stack is clean.
/// The copies are taken between the two reads of its files (the window
/// in which it must not run is only as long as the copying); the analysis
/// runs on the copies afterwards.
pub(super) fn check_blocked(tid: i32, t: View, check: &Check, maps: &crate::sys::maps::Maps) -> Outside {
    let Some(before) = Sched::read(tid) else { return Outside::Pending };
    if !before.blocked() {
        return Outside::Running;
    }
    let Some((_, sp, pc)) = before.regs() else { return Outside::Pending };
    let Some(rec) = state::find_or_claim(tid) else { return Outside::Pending };
    // Acquire pairs with the thread's AcqRel CASes.
    let w0 = rec.word.load(Ordering::Acquire);
    let s = t.effective(w0);
    if s == t.target {
        return Outside::Switched;
    }
    // Its shadow stack and its stack, copied.
    let mut entries = Vec::new();
    let known = crate::trace::lp_read_shadow(rec.shadow_cell.load(Ordering::Relaxed), |e| entries.push(e));
    let Some((lo, hi)) = maps.find(sp).map(|m| (m.start, m.end)) else { return Outside::Pending };
    // The whole stack, or no verdict: an old frame may be anywhere up to
    // its end, and a copy that stops short hides it from the unwind and
    // from the scan alike.
    let Some(bytes) = copy_stack(sp, hi) else { return Outside::Pending };
    // Inside tracer code (a trampoline, an op's callback): it may be on
    // its way from a function's entry site into the function, which no
    // frame shows yet (a thread that went through a site's direct jump to
    // a version before the transition was armed, now in the trampoline of
    // that version's own traced entry). It leaves soon: look again later.
    let in_tracer = crate::trace::Tracer::global().live_tracer_nesting(tid).is_some_and(|n| n > 0);
    let Some(after) = Sched::read(tid) else { return Outside::Pending };
    if after != before || !after.blocked() {
        return Outside::Pending; // it ran meanwhile: look again later
    }
    if in_tracer {
        rec.held.store(super::enter::held_word(stack::TRANSIT, s, 0), Ordering::Relaxed);
        return Outside::Pending;
    }
    let snap = Snapshot { base: sp, bytes };
    let (verdict, unreliable) = stack_verdict((t, s), check, (&snap, lo), (&entries, known), pc);
    rec.unreliable.store(unreliable, Ordering::Relaxed);
    if let Verdict::Hit { func, frame, .. } = verdict {
        rec.held.store(super::enter::held_word(func, s, frame), Ordering::Relaxed);
    }
    if verdict != Verdict::Clean {
        return Outside::Pending;
    }
    let new = state::word(t.gen, state::epoch(w0), t.target);
    // AcqRel: pairs with the thread's own CASes (note §5.4): it bumps the
    // epoch before entering a version it has not switched to, so a CAS on
    // `w0` fails if it did so since.
    match rec.word.compare_exchange(w0, new, Ordering::AcqRel, Ordering::Relaxed) {
        Ok(_) => {
            rec.held.store(0, Ordering::Relaxed);
            Outside::Switched
        }
        Err(_) => Outside::Pending,
    }
}

/// Copies `[sp, hi)` in pieces of at most [`COPY_PIECE`] bytes; `None`
/// if any piece comes back short (a truncated stack counts as "on the
/// stack": the caller retries later).
fn copy_stack(sp: usize, hi: usize) -> Option<Vec<u8>> {
    let mut bytes = vec![0u8; hi.checked_sub(sp)?];
    for (k, piece) in bytes.chunks_mut(COPY_PIECE).enumerate() {
        if crate::sys::mem::read_memory(sp + k * COPY_PIECE, piece) != piece.len() {
            return None;
        }
    }
    Some(bytes)
}

/// The largest single `process_vm_readv` of [`copy_stack`].
const COPY_PIECE: usize = 1 << 20;

/// The check of a copied stack (`snap`, in the mapping that starts at
/// `stack_lo`) and shadow stack (`entries`, whether they were read
/// whole): `(verdict, whether the unwind was unreliable)`.
fn stack_verdict(
    (t, s): (View, u8),
    check: &Check,
    (snap, stack_lo): (&Snapshot, usize),
    (entries, known): (&[crate::trace::LpShadowEntry], bool),
    pc: usize,
) -> (Verdict, bool) {
    let ranges = &check.ranges[s as usize];
    let sp = snap.base;
    // Entries of frames that are gone (longjmp) are ignored
    // (`stack::entry_alive`).
    let alive = |e: &crate::trace::LpShadowEntry| stack::entry_alive(e, (stack_lo, sp), snap, check.return_trampoline);
    let entries: Vec<_> = entries.iter().copied().filter(alive).collect();
    // Marked entries of this generation and state are frames it entered
    // through a stub; originals hide return addresses.
    let tag = state::tag32(t.gen, s);
    if let Some(k) = entries.iter().position(|e| e.marked == Some(tag)) {
        return (Verdict::Hit { func: u32::MAX - 1, frame: k as u32, reliable: true }, false);
    }
    // Its PC in code of no loaded object: a tracer stub, trampoline or
    // mirror slot before the count is raised (on its way into a function
    // whose frame nothing shows yet, as above), or a JIT's code. It counts
    // as in transit, also when the unwind below could not start (a thread
    // blocked in a system call is never there but for a JIT making raw
    // system calls, which then waits for `force`).
    if ranges.find(pc).is_none() && !stack::in_object(pc) {
        return (Verdict::Hit { func: stack::TRANSIT, frame: 0, reliable: true }, false);
    }
    let shadow = |slot: usize| entries.iter().find(|e| e.slot == slot).map(|e| e.orig);
    let l = Lookups { ranges, return_trampoline: check.return_trampoline, shadow: &shadow };
    let v = stack::unwind(Start { pc, sp, bp: None, exact: true }, snap, &l);
    if v != Verdict::Unreliable {
        return (v, false);
    }
    let v = stack::scan(Some(pc), sp, sp + snap.bytes.len(), snap, known, &l);
    if v != Verdict::Clean {
        return (v, true);
    }
    match entries.iter().find_map(|e| ranges.find(e.orig)) {
        Some(func) => (Verdict::Hit { func, frame: 0, reliable: false }, true),
        None => (Verdict::Clean, true),
    }
}

/// Names of the common system calls (x86-64 numbers), for reports.
pub(super) fn syscall_name(nr: i64) -> Option<&'static str> {
    Some(match nr {
        0 => "read",
        1 => "write",
        7 => "poll",
        23 => "select",
        35 => "nanosleep",
        43 => "accept",
        45 => "recvfrom",
        47 => "recvmsg",
        61 => "wait4",
        202 => "futex",
        230 => "clock_nanosleep",
        232 => "epoll_wait",
        270 => "pselect6",
        271 => "ppoll",
        281 => "epoll_pwait",
        288 => "accept4",
        441 => "epoll_pwait2",
        _ => return None,
    })
}
