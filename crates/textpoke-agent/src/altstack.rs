//! Alternate signal stacks for recording threads, so that a stack
//! overflow still reaches the agent's fatal-signal handler (see `fatal`)
//! and the trace is flushed up to the function that overflowed: without
//! one, the kernel cannot push the signal frame and kills the process at
//! once.
//!
//! # When
//!
//! The recorder calls [`thread_start`] when a thread makes its buffer
//! (its first event in a session, step C4) and [`thread_exit`] when it
//! retires it (X1, at thread exit). A thread that has an alternate stack
//! already (the program's: Rust's runtime gives its threads one) keeps it;
//! otherwise it gets 256 KiB of its own (address space only until
//! touched, a guard page below), which [`thread_exit`] unmaps, after
//! turning it off. The agent's handler uses little of it (the flush runs
//! on a stack of its own); the room is for the handlers that now run there
//! rather than on the thread's stack: those asking for `SA_ONSTACK`,
//! textpoke's own (the breakpoint trap, the rendezvous), and what nests in
//! them.
//!
//! # Invisible
//!
//! `sigaltstack` is wrapped: on a thread with the agent's stack, the
//! program sees its own setting (none until it sets one); a stack it sets
//! replaces the agent's in the kernel, and turning its own off puts the
//! agent's back. A program handler asking for `SA_ONSTACK` on a thread
//! where the program set no stack runs on the agent's (it asked to run on
//! an alternate stack, and is written for one); handlers without it run
//! where they always did (`fatal` mirrors the flag).

use std::cell::Cell;
use std::ffi::c_int;
use textpoke_sys::{anon, signals};

/// Bytes of the agent's stack, and the guard page below it.
const SIZE: usize = 256 << 10;
const GUARD: usize = 4096;

thread_local! {
    /// The base of the agent's mapping for this thread (guard included);
    /// 0: none.
    static OURS: Cell<usize> = const { Cell::new(0) };
    /// The program set its own stack on this thread (the kernel's is then
    /// the program's).
    static PROGRAM_HAS_ONE: Cell<bool> = const { Cell::new(false) };
}

/// Has the recorder call [`thread_start`] and [`thread_exit`].
pub(crate) fn enable() {
    textpoke_record::set_thread_hooks(Some(thread_start), Some(thread_exit));
}

fn ours_stack(base: usize) -> libc::stack_t {
    libc::stack_t { ss_sp: (base + GUARD) as *mut libc::c_void, ss_flags: 0, ss_size: SIZE }
}

/// C4: gives the calling thread the agent's alternate stack unless it has
/// one. Async-signal-safe (`mmap`, `mprotect`, `sigaltstack`).
extern "C" fn thread_start() {
    if OURS.with(Cell::get) != 0 {
        return;
    }
    match signals::altstack() {
        Ok(cur) if cur.ss_flags & libc::SS_DISABLE != 0 => {}
        _ => return, // the program's (or we run on one)
    }
    // Its lowest page is a guard.
    let Some(p) = anon::map_with_guard(SIZE, GUARD) else {
        return;
    };
    let base = p as usize;
    // SAFETY: the stack is a fresh mapping of our own, unmapped only by
    // thread_exit once it is no longer the kernel's.
    if unsafe { signals::set_altstack(&ours_stack(base)) }.is_err() {
        // SAFETY: unmapping the mapping made above, never used.
        unsafe { anon::unmap(p, SIZE + GUARD) };
        return;
    }
    OURS.with(|o| o.set(base));
}

/// X1: turns the agent's stack off (if it is the kernel's) and unmaps it.
/// A thread that exits on it (from a handler running there) keeps it.
extern "C" fn thread_exit() {
    let base = OURS.with(Cell::get);
    if base == 0 {
        return;
    }
    let Ok(cur) = signals::altstack() else {
        return;
    };
    if cur.ss_sp as usize == base + GUARD && cur.ss_flags & libc::SS_DISABLE == 0 {
        // SAFETY: plain data.
        let mut off: libc::stack_t = unsafe { std::mem::zeroed() };
        off.ss_flags = libc::SS_DISABLE;
        // SAFETY: turning the stack off needs no memory.
        if unsafe { signals::set_altstack(&off) }.is_err() {
            return; // running on it (EPERM): leave it mapped
        }
    }
    OURS.with(|o| o.set(0));
    // SAFETY: ours, and no longer the kernel's alternate stack.
    unsafe { anon::unmap(base as *mut u8, SIZE + GUARD) };
}

/// `sigaltstack(2)`: on a thread with the agent's stack, the program's
/// own setting (see the module docs); elsewhere the kernel's.
///
/// # Safety
///
/// The arguments of `sigaltstack(2)`.
#[no_mangle]
pub unsafe extern "C" fn sigaltstack(ss: *const libc::stack_t, old: *mut libc::stack_t) -> c_int {
    let base = OURS.with(Cell::get);
    if base == 0 {
        // SAFETY: the caller's contract is the system call's.
        return unsafe { signals::sigaltstack_raw(ss, old) };
    }
    let program = PROGRAM_HAS_ONE.with(Cell::get);
    let Ok(cur) = signals::altstack() else {
        return -1;
    };
    let view = if program {
        cur
    } else {
        // As the kernel reports a thread without one.
        libc::stack_t { ss_sp: std::ptr::null_mut(), ss_flags: libc::SS_DISABLE, ss_size: 0 }
    };
    if !ss.is_null() {
        // SAFETY: the caller's contract.
        let new = unsafe { *ss };
        if new.ss_flags & libc::SS_DISABLE != 0 {
            if program {
                // Back to the agent's (EPERM while on the program's).
                // SAFETY: the agent's stack, still mapped (see thread_exit).
                if unsafe { signals::set_altstack(&ours_stack(base)) }.is_err() {
                    return -1;
                }
                PROGRAM_HAS_ONE.with(|p| p.set(false));
            }
        } else {
            // SAFETY: the program's stack (the caller's contract).
            if unsafe { signals::set_altstack(&new) }.is_err() {
                return -1; // the kernel's errno (ENOMEM, EINVAL, EPERM)
            }
            PROGRAM_HAS_ONE.with(|p| p.set(true));
        }
    }
    if !old.is_null() {
        // SAFETY: the caller's contract: `old` is writable.
        unsafe { *old = view };
    }
    0
}
