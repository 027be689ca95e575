//! The slow path of a transition stub, and the self-check.
//!
//! `lp_enter` runs when a thread's mirror does not match its stub's word:
//! its first call in a transition, or any call while it has not switched.
//! Steps (note §4.2), under the tracer's quiescence count (so grace periods
//! wait for it, and a signal handler nested in it, or a call from tracer
//! code, is "nested": it never switches and pushes nothing):
//!
//! 1. No transition involves the site (a thread late in a stub after the
//!    transition completed): the settled version.
//! 2. The thread's effective state `s` is the target: set the mirror,
//!    return version(target).
//! 3. Not nested, and the thread holds no frame of version(s): no marked
//!    shadow entry of this generation and state (the exact count of the
//!    frames entered since the transition began), and its prefix is clean
//!    (a clean self-check earlier in this transition and reversal, or one
//!    now: `check_own_stack`). Then `CAS(word, w -> {gen, epoch, target})`:
//!    switched; return version(target).
//! 4. Else `CAS(word, w -> {gen, epoch + 1, s})` (an outside check that
//!    read `w` fails its CAS: note §5.4), push a marked shadow entry for
//!    this frame, return version(s). A frame that cannot be marked (nested
//!    call, full shadow stack) voids the prefix: the next check unwinds.
//!
//! Every read of the slots is inside a seqlock read section
//! (`state::read_begin`): a stale view is never mixed with new versions.
//! After a CAS the view is loaded again: a reversal meanwhile means the
//! decision is taken again. Decisions run inside a deciding section
//! (`state::Deciding`), which the completion waits for before its last
//! look at the records (`patcher.rs`). Before the transition is armed
//! (every site jumps to its stub) no thread switches: step 3 is skipped.

use super::stack::{self, Lookups, OwnMemory, Start, Verdict};
use super::state::{self, LpThread, View};
use crate::trace::{lp_guarded, lp_own_shadow, lp_push_marked, lp_return_trampoline};
use std::sync::atomic::{AtomicPtr, Ordering};

/// What a stack check compares against, for one transition (generation);
/// published before the transition ([`CHECK`]) and freed when the next
/// one starts, once the deciding sections (`state::Deciding`, inside which
/// every self-check runs) begun before are over.
pub(super) struct Check {
    pub gen: u32,
    /// By state ([`state::UNPATCHED`], [`state::PATCHED`]): the ranges of
    /// that state's versions of every function in the transition, and the
    /// transit ranges.
    pub ranges: [stack::Ranges; 3],
    pub return_trampoline: usize,
}

/// The current transition's [`Check`] (null before the first).
pub(super) static CHECK: AtomicPtr<Check> = AtomicPtr::new(std::ptr::null_mut());

/// The stub slow path's handler (`arch::tramp::live_slow_path`): returns
/// the version to jump to. Keeps `errno` (rule 9).
pub(super) extern "C" fn lp_enter(index: usize, entry_sp: usize, caller_bp: usize) -> usize {
    let errno = crate::sys::threads::errno();
    let v = lp_guarded(|nested| enter(index as u32, entry_sp, caller_bp, nested));
    crate::sys::threads::set_errno(errno);
    v
}

fn enter(index: u32, entry_sp: usize, caller_bp: usize, nested: bool) -> usize {
    let slot = state::slot(index);
    // Every decision below reads the transition word and may CAS from it.
    let _deciding = state::Deciding::enter();
    loop {
        let seq = state::read_begin();
        let t = View::load();
        if !t.active || slot.gen.load(Ordering::Relaxed) != t.gen {
            let v = slot.settled.load(Ordering::Relaxed);
            if state::read_ok(seq) {
                return v;
            }
            continue;
        }
        let Some(rec) = state::own_record() else {
            // No record (the table is full): the initial state, never switched.
            let v = slot.version[t.initial as usize].load(Ordering::Relaxed);
            if state::read_ok(seq) {
                return v;
            }
            continue;
        };
        // Acquire pairs with the AcqRel CAS of an outside switch.
        let w = rec.word.load(Ordering::Acquire);
        let s = t.effective(w);
        let v_target = slot.version[t.target as usize].load(Ordering::Relaxed);
        let v_s = slot.version[s as usize].load(Ordering::Relaxed);
        if !state::read_ok(seq) {
            continue;
        }
        if s == t.target {
            if (w >> 32) as u32 != t.gen {
                // At the target only by "completing": make it its own, so
                // that a completion that does not happen leaves it there.
                let new = state::word(t.gen, state::epoch(w), t.target);
                // AcqRel: as every CAS of a thread word.
                if rec.word.compare_exchange(w, new, Ordering::AcqRel, Ordering::Relaxed).is_err() {
                    continue;
                }
            }
            state::set_own_mirror(t);
            return v_target;
        }
        // SAFETY: entry_sp is the address of the function's return address.
        let ra = unsafe { *(entry_sp as *const usize) };
        let start = Start { pc: ra, sp: entry_sp + 8, bp: Some(caller_bp), exact: false };
        if !nested && t.armed && self_clean(rec, t, s, start) {
            let new = state::word(t.gen, state::epoch(w), t.target);
            // AcqRel: pairs with other CASes of this word (outside, force).
            if rec.word.compare_exchange(w, new, Ordering::AcqRel, Ordering::Relaxed).is_err() || View::load() != t {
                continue;
            }
            state::set_own_mirror(t);
            return v_target;
        }
        let new = state::word(t.gen, state::epoch(w).wrapping_add(1), s);
        // AcqRel: as above; the epoch bump fails any outside CAS that read `w`.
        if rec.word.compare_exchange(w, new, Ordering::AcqRel, Ordering::Relaxed).is_err() || View::load() != t {
            continue;
        }
        if nested || !lp_push_marked(entry_sp, state::tag32(t.gen, s)) {
            rec.prefix.store(0, Ordering::Relaxed);
        }
        return v_s;
    }
}

/// Whether the calling thread holds no frame of version(`s`) (step 3).
pub(super) fn self_clean(rec: &LpThread, t: View, s: u8, start: Start) -> bool {
    let tag = state::tag32(t.gen, s);
    let mut marked = 0u32;
    let ret = lp_return_trampoline();
    let mut bounds = None; // a system call, only when an entry is marked
                           // Entries of frames that are gone (longjmp) do not count
                           // (`stack::entry_alive`).
    lp_own_shadow(|e| {
        if e.marked == Some(tag) {
            let b = *bounds.get_or_insert_with(|| own_stack_bounds(start));
            marked += u32::from(stack::entry_alive(&e, b, &OwnMemory, ret));
        }
    });
    if marked > 0 {
        rec.held.store(held_word(u32::MAX - 1, s, 0), Ordering::Relaxed);
        return false;
    }
    if rec.prefix.load(Ordering::Relaxed) == t.prefix() {
        return true;
    }
    let now = state::now_ns();
    if now < rec.retry_at.load(Ordering::Relaxed) {
        return false;
    }
    rec.last_sp.store(start.sp, Ordering::Relaxed);
    let verdict = check_own_stack(rec, t, s, start);
    rec.unreliable.store(matches!(verdict, Verdict::Unreliable), Ordering::Relaxed);
    match verdict {
        Verdict::Clean => {
            rec.prefix.store(t.prefix(), Ordering::Relaxed);
            rec.backoff.store(0, Ordering::Relaxed);
            rec.held.store(0, Ordering::Relaxed);
            true
        }
        v => {
            if let Verdict::Hit { func, frame, .. } = v {
                rec.held.store(held_word(func, s, frame), Ordering::Relaxed);
            }
            // Backoff 1, 2, 4 ... 64 ms between self-checks.
            let b = rec.backoff.load(Ordering::Relaxed).min(6);
            rec.backoff.store(b + 1, Ordering::Relaxed);
            rec.retry_at.store(now + (1_000_000 << b), Ordering::Relaxed);
            false
        }
    }
}

/// `(lo, sp)` for [`stack::entry_alive`] on the calling thread's stack,
/// `start` being the caller frame of a function being entered: `sp` is
/// that function's return slot (`start.sp - 8`: the lowest slot of a live
/// frame; the checkpoint op runs after the slow path may have marked it),
/// everything below is its own stack (`lo` 0), except on an alternate
/// signal stack, which may lie below the stack holding older frames
/// (`lo` = `sp`: no entry is dropped for its place).
fn own_stack_bounds(start: Start) -> (usize, usize) {
    let slot = start.sp - 8;
    let on_alt = crate::sys::signals::altstack().is_ok_and(|a| a.ss_flags & libc::SS_ONSTACK != 0);
    (if on_alt { slot } else { 0 }, slot)
}

/// `func + 1 | state << 32 | frame << 40` (`LpThread::held`).
pub(super) fn held_word(func: u32, s: u8, frame: u32) -> u64 {
    u64::from(func.wrapping_add(1)) | u64::from(s) << 32 | u64::from(frame.min(0xff_ffff)) << 40
}

/// A reliable unwind of the calling thread from `start`, else the scan of
/// its stack (when the control side told it where its stack ends).
fn check_own_stack(rec: &LpThread, t: View, s: u8, start: Start) -> Verdict {
    // Acquire pairs with the AcqRel swap publishing the transition's check.
    // SAFETY: a published Check is freed only after the deciding sections
    // begun before its unpublishing are over; this runs inside one.
    let Some(check) = (unsafe { CHECK.load(Ordering::Acquire).as_ref() }) else { return Verdict::Unreliable };
    if check.gen != t.gen {
        return Verdict::Unreliable;
    }
    // On an alternate signal stack the unwind would meet the signal frame;
    // and its few KiB are no place for the unwind context.
    if crate::sys::signals::altstack().is_ok_and(|a| a.ss_flags & libc::SS_ONSTACK != 0) {
        return Verdict::Unreliable;
    }
    let ranges = &check.ranges[s as usize];
    let own_shadow = |slot: usize| {
        let mut orig = None;
        lp_own_shadow(|e| {
            if e.slot == slot {
                orig = Some(e.orig);
            }
        });
        orig
    };
    let l = Lookups { ranges, return_trampoline: check.return_trampoline, shadow: &own_shadow };
    let v = stack::unwind(start, &OwnMemory, &l);
    if v != Verdict::Unreliable {
        return v;
    }
    let hi = rec.stack_hi.load(Ordering::Relaxed);
    if hi <= start.sp {
        return Verdict::Unreliable; // the control side fills it in (from last_sp)
    }
    match stack::scan(None, start.sp, hi, &OwnMemory, true, &l) {
        Verdict::Clean => {
            let mut hit = None;
            lp_own_shadow(|e| {
                // Not on an alternate stack (above): `lo` 0.
                if hit.is_none() && stack::entry_alive(&e, (0, start.sp - 8), &OwnMemory, check.return_trampoline) {
                    hit = ranges.find(e.orig);
                }
            });
            match hit {
                Some(func) => Verdict::Hit { func, frame: 0, reliable: false },
                None => Verdict::Clean,
            }
        }
        v => v,
    }
}

/// The self-check and switch of a thread at any traced function entry
/// (the checkpoint op, note §5.3): no frame is pushed, no version chosen.
/// `start` is the entered function's caller frame; `entering` the entered
/// function's address, if known.
///
/// The function being entered counts as held: its frame is not on the
/// stack the unwind from `start` walks, yet the thread is inside it. That
/// matters for a version's own traced entry (a replacement's pad): a
/// thread that went through a site's direct jump to the replacement just
/// before the transition's stubs were armed is entering the patched
/// version unmarked; switched here, it would run the rest of that
/// version's callees in the other state (outer new, inner old: a mix;
/// seen in tests/live.rs once the op reached every pad).
pub(super) fn checkpoint(start: Start, entering: Option<usize>) {
    let t = View::load();
    if !t.active {
        return;
    }
    let Some(rec) = state::own_record() else { return };
    // At the target already: nothing to decide (the common case, which
    // stays out of the deciding sections the completion waits for).
    if t.effective(rec.word.load(Ordering::Acquire)) == t.target {
        return;
    }
    let _deciding = state::Deciding::enter();
    let t = View::load();
    if !t.active || !t.armed {
        return;
    }
    let w = rec.word.load(Ordering::Acquire); // pairs as in `enter`
    let s = t.effective(w);
    if s == t.target {
        return;
    }
    if let Some(func) = entering.and_then(|pc| entering_version(t, s, pc)) {
        rec.held.store(held_word(func, s, 0), Ordering::Relaxed);
        return;
    }
    if self_clean(rec, t, s, start) {
        let new = state::word(t.gen, state::epoch(w), t.target);
        // AcqRel: as in `enter`. A failure: the next entry tries again.
        if rec.word.compare_exchange(w, new, Ordering::AcqRel, Ordering::Relaxed).is_ok() && View::load() == t {
            state::set_own_mirror(t);
        }
    }
}

/// The function of the transition whose version(`s`) holds `pc` (an
/// entry being entered), if any; unknown check data counts as held.
fn entering_version(t: View, s: u8, pc: usize) -> Option<u32> {
    // Acquire pairs with the AcqRel swap publishing the transition's check.
    // SAFETY: as in `check_own_stack`: read inside a deciding section.
    match unsafe { CHECK.load(Ordering::Acquire).as_ref() } {
        Some(check) if check.gen == t.gen => check.ranges[s as usize].find(pc),
        _ => Some(stack::TRANSIT),
    }
}

/// The calling thread (the one driving the transition) checks and
/// switches itself: it is running, so nobody else can.
#[inline(never)]
pub(super) fn check_current_thread() {
    let (pc, sp, bp): (usize, usize, usize);
    // SAFETY: reads rip (of this instruction), rsp and rbp; no memory,
    // no stack, flags kept.
    unsafe {
        std::arch::asm!("lea {pc}, [rip]", "mov {sp}, rsp", "mov {bp}, rbp",
            pc = out(reg) pc, sp = out(reg) sp, bp = out(reg) bp, options(nomem, nostack, preserves_flags));
    }
    lp_guarded(|nested| {
        if !nested {
            checkpoint(Start { pc, sp, bp: Some(bp), exact: true }, None);
        }
    });
}
