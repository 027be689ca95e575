//! Signal dispositions and masks: the one place textpoke calls
//! `sigaction`, `pthread_sigmask` and `tgkill`.
//!
//! # The mask of textpoke's handlers
//!
//! Every handler textpoke installs (the SIGTRAP handler of the breakpoint
//! protocol, the rendezvous handler) runs with every signal blocked but
//! the [`SYNCHRONOUS`] ones, and the stop-machine patcher blocks the same
//! set on its own thread while other threads are parked:
//! [`all_but_synchronous`] builds that set once for the three. Asynchronous
//! signals wait until the short handler (or the short write) is done; the
//! synchronous ones cannot wait — a fault or a trap raised while they are
//! blocked kills the process — and a handler that raises one is broken
//! anyway, so leaving them deliverable costs nothing.
//!
//! # Raw kernel masks
//!
//! [`block_all_raw`] and [`restore_mask_raw`] are `rt_sigprocmask` itself,
//! on the kernel's 8-byte mask, for code that runs at a traced site (where
//! only the registers a stub saved may change, so glibc's helpers, which
//! may use vector registers, are out) and must keep `errno`.

use std::io;

/// The signals a thread raises itself by faulting or trapping: they are
/// never blocked by textpoke (see the module docs).
pub const SYNCHRONOUS: [libc::c_int; 5] = [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE, libc::SIGTRAP];

/// An `SA_SIGINFO` handler.
pub type InfoHandler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// The highest real-time signal number (`SIGRTMAX`, as glibc reserves
/// the lowest ones for itself).
pub fn realtime_max() -> libc::c_int {
    libc::SIGRTMAX()
}

/// Every signal but the [`SYNCHRONOUS`] ones.
pub fn all_but_synchronous() -> libc::sigset_t {
    all_but(&SYNCHRONOUS)
}

/// The set of `signals` (`sigemptyset`, `sigaddset` on a local set: no
/// system call). Async-signal-safe.
pub fn set_of(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset and sigaddset write only
    // the set they are given.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Every signal but `signals` (`sigfillset`, `sigdelset` on a local set:
/// no system call). Async-signal-safe.
pub fn all_but(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: as in `set_of`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for &s in signals {
            libc::sigdelset(&mut set, s);
        }
        set
    }
}

/// Whether `sig` is in `set` (`sigismember`; false for an invalid number).
pub fn contains(set: &libc::sigset_t, sig: libc::c_int) -> bool {
    // SAFETY: a valid set; sigismember only reads it.
    unsafe { libc::sigismember(set, sig) == 1 }
}

/// Takes `sig` out of `set` (`sigdelset`: no system call). Async-signal-safe.
pub fn remove(set: &mut libc::sigset_t, sig: libc::c_int) {
    // SAFETY: a valid set; sigdelset writes only it.
    unsafe { libc::sigdelset(set, sig) };
}

/// The signals the kernel sends the process for the CPU time its threads
/// use: `SIGPROF` (`ITIMER_PROF`, a profiler's timer), `SIGVTALRM`
/// (`ITIMER_VIRTUAL`) and `SIGXCPU` (`RLIMIT_CPU`). The kernel gives such
/// a signal to the thread that was running when the timer expired, unless
/// that thread blocks it; then to another thread, round-robin, a sleeping
/// one included (`complete_signal`, kernel/signal.c), whose `nanosleep`
/// then fails with `EINTR` (a handler ends it whatever `SA_RESTART` says).
/// A textpoke thread uses the program's CPU time like any other, so it
/// must not block these: the program's handler then runs on it, as it
/// would on whichever program thread had been running (profilers are
/// written for that). DESIGN.md rule 9.
pub const CPU_TIME: [libc::c_int; 3] = [libc::SIGPROF, libc::SIGVTALRM, libc::SIGXCPU];

/// The mask of a long-lived textpoke service thread (the recorder's
/// writer, the agent's attach thread): every signal blocked but the
/// [`SYNCHRONOUS`] ones, `SIGSYS` (raised by a seccomp filter on the
/// thread's own system call, like a fault), the [`CPU_TIME`] ones (their
/// delivery follows the thread that used the time) and `rendezvous`, the
/// signal the engine's rendezvous parks threads with, which must reach
/// every thread. Such a thread, started with this mask (see
/// [`swap_mask`]), takes no other signal meant for the program: the kernel
/// delivers those to a program thread that does not block them.
pub fn service_thread_mask(rendezvous: libc::c_int) -> libc::sigset_t {
    let mut set = all_but(&SYNCHRONOUS);
    remove(&mut set, libc::SIGSYS);
    for s in CPU_TIME {
        remove(&mut set, s);
    }
    remove(&mut set, rendezvous);
    set
}

/// Changes the calling thread's signal mask (`pthread_sigmask(how, set,
/// NULL)`; `how` is `SIG_BLOCK`, `SIG_UNBLOCK` or `SIG_SETMASK`).
/// Async-signal-safe.
pub fn set_mask(how: libc::c_int, set: &libc::sigset_t) {
    // SAFETY: a valid set; no old mask is asked for.
    unsafe { libc::pthread_sigmask(how, set, std::ptr::null_mut()) };
}

/// As [`set_mask`], and returns the mask the thread had before (to give
/// back with `set_mask(SIG_SETMASK, &old)`). Async-signal-safe.
pub fn swap_mask(how: libc::c_int, set: &libc::sigset_t) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; pthread_sigmask writes the old mask.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to sigsets.
    unsafe { libc::pthread_sigmask(how, set, &mut old) };
    old
}

/// The calling thread's signal mask.
pub fn current_mask() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; SIG_BLOCK with no new set only
    // reads the mask.
    unsafe {
        let mut cur: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur);
        cur
    }
}

/// The action that runs `handler` with `SA_SIGINFO | flags`, every
/// asynchronous signal blocked meanwhile ([`all_but_synchronous`]).
pub fn handler_action(handler: InfoHandler, flags: libc::c_int) -> libc::sigaction {
    // SAFETY: sigaction is plain data; the fields used are set below.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | flags;
    sa.sa_mask = all_but_synchronous();
    sa
}

/// Installs `handler` for `sig` as [`handler_action`] makes it.
pub fn install(sig: libc::c_int, handler: InfoHandler, flags: libc::c_int) -> io::Result<()> {
    let sa = handler_action(handler, flags);
    // SAFETY: the action runs a function of the right type for SA_SIGINFO.
    unsafe { set_action(sig, &sa) }
}

/// The current disposition of `sig` (a zeroed action, `SIG_DFL`, if the
/// number is invalid).
pub fn action(sig: libc::c_int) -> libc::sigaction {
    // SAFETY: sigaction is plain data; querying changes nothing.
    unsafe {
        let mut cur: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut cur);
        cur
    }
}

/// Sets the disposition of `sig`. Async-signal-safe.
///
/// # Safety
///
/// `act.sa_sigaction` must be `SIG_DFL`, `SIG_IGN`, or a function of the
/// type its `sa_flags` say (`SA_SIGINFO`: an [`InfoHandler`], else
/// `extern "C" fn(c_int)`) that stays callable for as long as it may be
/// delivered.
pub unsafe fn set_action(sig: libc::c_int, act: &libc::sigaction) -> io::Result<()> {
    // SAFETY: `act` is a valid action (the caller's guarantee for its
    // handler); no old action is asked for.
    if unsafe { libc::sigaction(sig, act, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Does what `SIG_DFL` does for `sig`, from a handler of it: restores the
/// default disposition and sends `sig` to the calling thread. The default
/// action (for SIGTRAP, terminate with a core dump) happens when the
/// signal is unblocked: at once in a handler installed with `SA_NODEFER`.
/// Async-signal-safe.
#[cold]
pub fn raise_default(sig: libc::c_int) {
    // SAFETY: sigaction is plain data; SIG_DFL is a valid disposition.
    let mut dfl: libc::sigaction = unsafe { std::mem::zeroed() };
    dfl.sa_sigaction = libc::SIG_DFL;
    // SAFETY: as above.
    let _ = unsafe { set_action(sig, &dfl) };
    let _ = super::threads::kill_thread(super::threads::gettid(), sig);
}

/// Sets the kernel's disposition of `sig` to `SIG_DFL` with a raw
/// `rt_sigaction` system call, bypassing the C library (and any
/// interposed `sigaction`): no restorer is needed for `SIG_DFL`. Errors
/// are ignored. Async-signal-safe; for the agent's fatal-signal handler.
pub fn set_default_raw(sig: libc::c_int) {
    /// The kernel's `struct sigaction` on x86-64.
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    let dfl = KernelSigaction { handler: libc::SIG_DFL, flags: 0, restorer: 0, mask: 0 };
    // SAFETY: a valid kernel sigaction of the mask size passed (8 bytes);
    // no old action is asked for.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            &dfl as *const KernelSigaction,
            std::ptr::null_mut::<KernelSigaction>(),
            8usize,
        )
    };
}

/// The `sigaltstack` system call itself, bypassing the C library (and
/// the agent's interposed `sigaltstack`): -1 with `errno` set on failure.
/// Async-signal-safe.
///
/// # Safety
///
/// `ss` and `old` are null or valid pointers; a stack `ss` sets (unless
/// its `ss_flags` is `SS_DISABLE`) is writable memory that nothing else
/// uses and that stays mapped for as long as it is this thread's
/// alternate stack.
pub unsafe fn sigaltstack_raw(ss: *const libc::stack_t, old: *mut libc::stack_t) -> libc::c_int {
    // SAFETY: the caller's guarantee.
    unsafe { libc::syscall(libc::SYS_sigaltstack, ss, old) as libc::c_int }
}

/// The calling thread's alternate signal stack, as the kernel has it
/// ([`sigaltstack_raw`]). Async-signal-safe.
pub fn altstack() -> io::Result<libc::stack_t> {
    // SAFETY: stack_t is plain data.
    let mut cur: libc::stack_t = unsafe { std::mem::zeroed() };
    // SAFETY: no new stack; a valid pointer for the old one.
    if unsafe { sigaltstack_raw(std::ptr::null(), &mut cur) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cur)
}

/// Sets (or, with `SS_DISABLE`, turns off) the calling thread's alternate
/// signal stack ([`sigaltstack_raw`]). Errors: `EPERM` while running on
/// the current one. Async-signal-safe.
///
/// # Safety
///
/// Unless `ss.ss_flags` is `SS_DISABLE`, `ss.ss_sp..+ss.ss_size` must be
/// writable memory that nothing else uses and that stays mapped for as
/// long as it is this thread's alternate stack.
pub unsafe fn set_altstack(ss: &libc::stack_t) -> io::Result<()> {
    // SAFETY: a valid stack_t (the caller's guarantee for its memory); no
    // old stack is asked for.
    if unsafe { sigaltstack_raw(ss, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// This thread's signal mask as it was before [`block_async`]; restored
/// when dropped.
pub struct BlockedAsync {
    old: libc::sigset_t,
    /// A mask belongs to one thread.
    _thread_bound: std::marker::PhantomData<*const ()>,
}

/// Blocks every asynchronous signal ([`all_but_synchronous`]) on the
/// calling thread until the result is dropped.
pub fn block_async() -> BlockedAsync {
    let set = all_but_synchronous();
    // SAFETY: sigset_t is plain data; pthread_sigmask writes the old mask.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to sigsets.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) };
    BlockedAsync { old, _thread_bound: std::marker::PhantomData }
}

impl Drop for BlockedAsync {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `block_async` on this thread.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// Blocks every signal on the calling thread with the raw system call and
/// returns the kernel mask it had (see the module docs, "Raw kernel
/// masks"). Async-signal-safe; leaves `errno` alone on success.
#[inline(always)]
pub fn block_all_raw() -> u64 {
    let (all, mut old) = (!0u64, 0u64);
    // SAFETY: rt_sigprocmask with valid pointers to kernel sigsets (8 bytes
    // on x86-64).
    unsafe { libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_BLOCK, &all, &mut old, 8) };
    old
}

/// Sets the calling thread's kernel mask back to `old`, as
/// [`block_all_raw`] returned it. Async-signal-safe.
#[inline(always)]
pub fn restore_mask_raw(old: u64) {
    // SAFETY: rt_sigprocmask with a valid pointer to a kernel sigset.
    unsafe { libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, &old, std::ptr::null_mut::<u64>(), 8) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_member(set: &libc::sigset_t, sig: libc::c_int) -> bool {
        contains(set, sig)
    }

    #[test]
    fn blocks_asynchronous_signals_only_and_restores() {
        let set = all_but_synchronous();
        for s in SYNCHRONOUS {
            assert!(!is_member(&set, s), "signal {s} stays deliverable");
        }
        for s in [libc::SIGINT, libc::SIGUSR1, libc::SIGALRM, libc::SIGRTMAX()] {
            assert!(is_member(&set, s), "signal {s} is blocked");
        }
        std::thread::spawn(|| {
            assert!(!is_member(&current_mask(), libc::SIGUSR2));
            let blocked = block_async();
            assert!(is_member(&current_mask(), libc::SIGUSR2));
            assert!(!is_member(&current_mask(), libc::SIGSEGV));
            drop(blocked);
            assert!(!is_member(&current_mask(), libc::SIGUSR2));
            let old = block_all_raw();
            assert!(is_member(&current_mask(), libc::SIGUSR2));
            restore_mask_raw(old);
            assert!(!is_member(&current_mask(), libc::SIGUSR2));
        })
        .join()
        .unwrap();
    }

    extern "C" fn ignore(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

    #[test]
    fn installs_and_reads_back() {
        // SIGWINCH: ignored by default, nothing else in the tests uses it.
        let before = action(libc::SIGWINCH);
        install(libc::SIGWINCH, ignore, libc::SA_RESTART).unwrap();
        let now = action(libc::SIGWINCH);
        assert_eq!(now.sa_sigaction, ignore as *const () as usize);
        assert_ne!(now.sa_flags & libc::SA_SIGINFO, 0);
        assert!(is_member(&now.sa_mask, libc::SIGINT) && !is_member(&now.sa_mask, libc::SIGTRAP));
        // SAFETY: the disposition read before, put back.
        unsafe { set_action(libc::SIGWINCH, &before) }.unwrap();
        assert_eq!(action(libc::SIGWINCH).sa_sigaction, before.sa_sigaction);
    }

    #[test]
    fn service_threads_take_only_the_signals_that_must_reach_them() {
        let rendezvous = realtime_max() - 1;
        let set = service_thread_mask(rendezvous);
        for s in SYNCHRONOUS.into_iter().chain([libc::SIGSYS, rendezvous]) {
            assert!(!contains(&set, s), "signal {s} stays deliverable");
        }
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1, libc::SIGCHLD, realtime_max()] {
            assert!(contains(&set, s), "signal {s} is blocked");
        }
        let few = set_of(&[libc::SIGUSR1, libc::SIGHUP]);
        assert!(contains(&few, libc::SIGUSR1) && contains(&few, libc::SIGHUP) && !contains(&few, libc::SIGINT));
        std::thread::spawn(move || {
            let old = swap_mask(libc::SIG_BLOCK, &set);
            assert!(!contains(&old, libc::SIGUSR1));
            assert!(contains(&current_mask(), libc::SIGUSR1));
            set_mask(libc::SIG_UNBLOCK, &set_of(&[libc::SIGUSR1]));
            assert!(!contains(&current_mask(), libc::SIGUSR1));
            assert!(contains(&current_mask(), libc::SIGUSR2));
            set_mask(libc::SIG_SETMASK, &old);
            assert!(!contains(&current_mask(), libc::SIGUSR2));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn sets_and_turns_off_an_alternate_stack() {
        std::thread::spawn(|| {
            const LEN: usize = 64 << 10;
            let p = crate::anon::map_with_guard(LEN, crate::anon::PAGE).unwrap();
            let mut probe = [0u8; 8];
            assert_eq!(crate::read_memory(p as usize, &mut probe), 0, "the guard page is inaccessible");
            assert_eq!(crate::read_memory(p as usize + crate::anon::PAGE, &mut probe), 8);
            // SAFETY: plain data.
            let mut off: libc::stack_t = unsafe { std::mem::zeroed() };
            off.ss_flags = libc::SS_DISABLE;
            // SAFETY: turning a stack off needs no memory.
            unsafe { set_altstack(&off) }.unwrap();
            assert_ne!(altstack().unwrap().ss_flags & libc::SS_DISABLE, 0);
            let ours = libc::stack_t { ss_sp: p.wrapping_add(crate::anon::PAGE).cast(), ss_flags: 0, ss_size: LEN };
            // SAFETY: a fresh mapping of our own, unmapped only after the
            // stack is turned off below.
            unsafe { set_altstack(&ours) }.unwrap();
            let cur = altstack().unwrap();
            assert_eq!((cur.ss_sp, cur.ss_size, cur.ss_flags & libc::SS_DISABLE), (ours.ss_sp, LEN, 0));
            // SAFETY: as above.
            unsafe { set_altstack(&off) }.unwrap();
            // SAFETY: no longer the thread's stack; nothing else uses it.
            unsafe { crate::anon::unmap(p, LEN + crate::anon::PAGE) };
        })
        .join()
        .unwrap();
    }
}
