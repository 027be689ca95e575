//! The C library functions the agent wraps (see the crate docs, steps 3,
//! 5 and 6): the `exec` family, `_exit`/`_Exit`, `dlopen`, `dlclose`. The
//! real functions are found with `dlsym(RTLD_NEXT, …)` at load. (`fatal`
//! wraps `sigaction`, `signal`, `bsd_signal` and `sysv_signal`, and
//! `altstack` wraps `sigaltstack`, for the crash flush.)
//!
//! # _exit
//!
//! `_exit` is async-signal-safe, and programs use it that way: a `SIGTERM`
//! handler that cleans up and calls `_exit`. Such a handler may have
//! interrupted its thread inside `malloc` (holding the heap's lock), inside
//! stdio, or inside the agent's own code (holding the agent's lock).
//! Stopping the recorder cannot be made async-signal-safe: the final drain,
//! the metadata (JSON), the thread files' `fsync`, joining the writer
//! thread all allocate or take locks, in the library (`record::stop`).
//! Done on the thread in `_exit`, it would deadlock there, on a lock that
//! thread itself holds and will never release.
//!
//! So the wrapper does no such work: it asks the agent thread to stop the
//! recorder (an atomic and a byte down the wake pipe) and waits for its
//! answer, polling an atomic between `nanosleep`s, for at most
//! `server::exit::EXIT_STOP_TIMEOUT` (the stop itself may wait 2 s for threads
//! stuck in a record call, then `fsync`s every file). Everything on the
//! calling thread is async-signal-safe: atomics, `getpid`, `gettid`,
//! `fstat`, `write`, `clock_gettime`, `nanosleep`, `unlink`; no
//! allocation, no lock, no thread-local. A program thread that holds a lock
//! the agent thread needs can only make the agent thread wait; the wrapper
//! still returns to the real `_exit` after the timeout, and the trace is
//! left as the writer last wrote it, marked incomplete (which the trace
//! reader and `textpoke record` report), with a note on stderr. A stop
//! cut short by the exit leaves it so too: the library replaces each file
//! whole (temporary file, rename) and marks the trace complete last.
//! Without an agent thread (it could not be started) the trace is left
//! incomplete at once.
//!
//! # exec
//!
//! An exec wrapper may run in a `vfork` child, which shares the parent's
//! memory while the parent thread waits: it must not allocate, lock, or
//! change any state of the parent. So the environment for the new program
//! is built in memory from `mmap` (unmapped again if the exec fails), from
//! the directory snapshot the agent keeps as a C string, and only a wrapper
//! running in the agent's own process (its pid is the agent's) stops the
//! recorder. The environment is rewritten only when the program passes
//! `TEXTPOKE_DIR` on (a program that builds a clean environment gets it
//! as it built it): `TEXTPOKE_DIR` becomes the new program's directory and
//! `TEXTPOKE_PID` the pid that writes it.
//!
//! `execl`, `execlp` and `execle` are variadic, which stable Rust cannot
//! define: a naked stub stores the five (aarch64: seven) argument registers after the
//! first next to each other and passes them, with the address of the
//! arguments on the stack, to [`execl_impl`], which walks the list to its
//! NULL (and, for `execle`, the environment after it).
//!
//! # dlopen
//!
//! glibc's `dlopen` decides where to look for a library from its caller
//! (the caller's `RUNPATH`, its `$ORIGIN`, its namespace), found through
//! the return address. A wrapper that called it would be the caller. So
//! the wrapper is a naked stub that calls [`on_dlopen`] (which only wakes
//! the agent thread) and then *jumps* to the real `dlopen` with the
//! original return address on the stack.

use crate::server;
use crate::{as_agent, dir_snapshot, getpid, in_agent, AGENT, AGENT_PID, LOADED, STARTED};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicUsize, Ordering};
use textpoke_record::format::CHILD_DIR_PREFIX;

extern "C" {
    static mut environ: *const *const c_char;
}

const EXECVE: usize = 0;
const EXECVPE: usize = 1;
const FEXECVE: usize = 2;
const EXECVEAT: usize = 3;
const EXIT: usize = 4;
const DLOPEN: usize = 5;
const DLCLOSE: usize = 6;
const NAMES: [&CStr; 7] = [c"execve", c"execvpe", c"fexecve", c"execveat", c"_exit", c"dlopen", c"dlclose"];
static REAL: [AtomicUsize; 7] = [const { AtomicUsize::new(0) }; 7];

/// Finds the real functions (at load, so that wrappers never need the
/// loader, which a `vfork` child must not call).
pub(crate) fn resolve() {
    for (i, name) in NAMES.iter().enumerate() {
        // SAFETY: RTLD_NEXT lookup of a NUL-terminated name.
        let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
        REAL[i].store(p as usize, Ordering::Release);
    }
}

fn real(i: usize) -> usize {
    let p = REAL[i].load(Ordering::Acquire);
    if p != 0 {
        return p;
    }
    // A wrapper called before the agent's constructor ran.
    // SAFETY: as in `resolve`.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, NAMES[i].as_ptr()) } as usize;
    REAL[i].store(p, Ordering::Release);
    p
}

use textpoke_sys::threads::{errno, set_errno};

/// The wrapper runs in the agent's process (not a `vfork` child).
fn own_process() -> bool {
    getpid() == AGENT_PID.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------
// Memory for the new environment.

/// Anonymous memory (never malloc: see the module docs), from
/// [`textpoke_sys::anon`].
struct Scratch {
    base: *mut u8,
    len: usize,
    used: usize,
}

impl Scratch {
    fn new(len: usize) -> Option<Scratch> {
        let base = textpoke_sys::anon::map(len)?;
        Some(Scratch { base, len, used: 0 })
    }

    /// `n` pointer slots.
    fn slots(&mut self, n: usize) -> *mut *const c_char {
        let off = self.used.next_multiple_of(8);
        assert!(off + n * 8 <= self.len, "scratch sized by the caller");
        self.used = off + n * 8;
        // SAFETY: in bounds (checked), 8-aligned (mmap is page-aligned).
        unsafe { self.base.add(off).cast() }
    }

    /// The concatenation of `parts` as a C string.
    fn string(&mut self, parts: &[&[u8]]) -> *const c_char {
        let total: usize = parts.iter().map(|p| p.len()).sum::<usize>() + 1;
        assert!(self.used + total <= self.len, "scratch sized by the caller");
        // SAFETY: in bounds (checked); the parts do not overlap the block.
        unsafe {
            let start = self.base.add(self.used);
            let mut at = start;
            for p in parts {
                std::ptr::copy_nonoverlapping(p.as_ptr(), at, p.len());
                at = at.add(p.len());
            }
            *at = 0;
            self.used += total;
            start.cast()
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`; the exec it was for
        // has failed (or was never tried), so nothing uses it any more.
        unsafe { textpoke_sys::anon::unmap(self.base, self.len) };
    }
}

/// Decimal digits of `v` without allocating.
fn digits(v: i32, buf: &mut [u8; 12]) -> &[u8] {
    let mut n = v.unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// The entries of a NULL-terminated array of C strings (a NULL array is
/// empty).
///
/// # Safety
///
/// `v` is NULL or a valid NULL-terminated array of valid C strings.
unsafe fn entries<'a>(v: *const *const c_char) -> impl Iterator<Item = *const c_char> + 'a {
    let mut i = 0;
    std::iter::from_fn(move || {
        if v.is_null() {
            return None;
        }
        // SAFETY: the caller's contract; we stop at the NULL.
        let e = unsafe { *v.add(i) };
        i += 1;
        (!e.is_null()).then_some(e)
    })
}

/// Whether the environment entry `e` (`NAME=VALUE`) sets the variable
/// `name` (which holds no NUL and no `=`).
///
/// # Safety
///
/// `e` is a valid C string.
unsafe fn sets_var(e: *const c_char, name: &str) -> bool {
    // SAFETY: comparing byte by byte, stopping at the string's NUL (which
    // never equals a byte of the name); when the whole name matched, the
    // string goes on at least to its NUL at `name.len()`.
    name.bytes().enumerate().all(|(i, b)| unsafe { *e.add(i) } as u8 == b)
        && unsafe { *e.add(name.len()) } == b'=' as c_char
}

/// The variables an exec rewrites (see the module docs).
const DIR_VAR: &str = textpoke_control::agent::DIR_ENV;
const PID_VAR: &str = textpoke_control::agent::PID_ENV;

/// The environment for the program an exec starts.
struct ExecEnv {
    envp: *const *const c_char,
    _memory: Option<Scratch>,
    own: bool,
}

/// Stops recording (in the agent's own process) and builds the new
/// program's environment (see the module docs).
///
/// # Safety
///
/// `envp` is NULL or a valid environment array.
unsafe fn prepare_exec(envp: *const *const c_char) -> ExecEnv {
    let pass = ExecEnv { envp, _memory: None, own: false };
    if !LOADED.load(Ordering::Acquire) || in_agent() {
        return pass;
    }
    let pid = getpid();
    let own = own_process();
    if own {
        as_agent(|| {
            if let Some(a) = AGENT.lock().as_mut() {
                crate::stop_recording(a, "exec");
            }
            server::socket::remove_socket();
        });
    }
    let base = dir_snapshot();
    // SAFETY: the caller's contract.
    let has_dir = unsafe { entries(envp) }.any(|e| unsafe { sets_var(e, DIR_VAR) });
    if base.is_null() || !has_dir {
        return ExecEnv { own, ..pass };
    }
    // SAFETY: a leaked C string that is never freed.
    let base = unsafe { CStr::from_ptr(base) }.to_bytes();
    let mut buf = [0u8; 12];
    let pid_digits = digits(pid, &mut buf);
    let (dir, child) = (DIR_VAR.as_bytes(), CHILD_DIR_PREFIX.as_bytes());
    let dir_parts: &[&[u8]] = if !own {
        &[dir, b"=", base, b"/", child, pid_digits]
    } else if STARTED.load(Ordering::Acquire) {
        &[dir, b"=", base, b"/", child, pid_digits, b"-exec"]
    } else {
        &[dir, b"=", base]
    };
    let pid_parts: &[&[u8]] = &[PID_VAR.as_bytes(), b"=", pid_digits];
    let size = |parts: &[&[u8]]| parts.iter().map(|p| p.len()).sum::<usize>() + 1;
    // SAFETY: the caller's contract.
    let count = unsafe { entries(envp) }.count();
    let Some(mut mem) = Scratch::new((count + 3) * 8 + size(dir_parts) + size(pid_parts)) else {
        return ExecEnv { own, ..pass };
    };
    let slots = mem.slots(count + 3);
    let mut k = 0;
    // SAFETY: the caller's contract.
    for e in unsafe { entries(envp) } {
        // SAFETY: `e` is a valid C string.
        if unsafe { sets_var(e, DIR_VAR) || sets_var(e, PID_VAR) } {
            continue;
        }
        // SAFETY: k < count + 3 slots.
        unsafe { *slots.add(k) = e };
        k += 1;
    }
    let dir_entry = mem.string(dir_parts);
    let pid_entry = mem.string(pid_parts);
    // SAFETY: k + 3 <= count + 3 slots.
    unsafe {
        *slots.add(k) = dir_entry;
        *slots.add(k + 1) = pid_entry;
        *slots.add(k + 2) = std::ptr::null();
    }
    ExecEnv { envp: slots, _memory: Some(mem), own }
}

/// Runs the real exec `f` with the prepared environment; on failure
/// (exec returned), frees it and keeps `errno`.
///
/// # Safety
///
/// `envp` as for [`prepare_exec`]; `f` performs an exec.
unsafe fn run_exec(envp: *const *const c_char, f: impl FnOnce(*const *const c_char) -> c_int) -> c_int {
    // SAFETY: the caller's contract.
    let env = unsafe { prepare_exec(envp) };
    let r = f(env.envp);
    let e = errno();
    let own = env.own;
    drop(env);
    if own {
        server::socket::exec_failed();
    }
    set_errno(e);
    r
}

type ExecveFn = unsafe extern "C" fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int;
type FexecveFn = unsafe extern "C" fn(c_int, *const *const c_char, *const *const c_char) -> c_int;
type ExecveatFn =
    unsafe extern "C" fn(c_int, *const c_char, *const *const c_char, *const *const c_char, c_int) -> c_int;

/// The real function `i` as type `F`, or `None` (ENOSYS) if not found.
fn real_fn<F: Copy>(i: usize) -> Option<F> {
    let p = real(i);
    // SAFETY: `F` is the function pointer type of the libc function `i`.
    (p != 0).then(|| unsafe { std::mem::transmute_copy::<usize, F>(&p) })
}

fn enosys() -> c_int {
    set_errno(libc::ENOSYS);
    -1
}

/// `execve(2)`, after stopping the recorder; see the module docs.
///
/// # Safety
///
/// The arguments of `execve(2)`.
#[no_mangle]
pub unsafe extern "C" fn execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    // SAFETY: the caller's contract.
    unsafe {
        run_exec(envp, |e| match real_fn::<ExecveFn>(EXECVE) {
            Some(f) => f(path, argv, e),
            None => enosys(),
        })
    }
}

/// `execv(3)`.
///
/// # Safety
///
/// The arguments of `execv(3)`.
#[no_mangle]
pub unsafe extern "C" fn execv(path: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: the caller's contract; `environ` is the process environment.
    unsafe { execve(path, argv, environ) }
}

/// `execvpe(3)`: the real one searches `PATH` as without the agent.
///
/// # Safety
///
/// The arguments of `execvpe(3)`.
#[no_mangle]
pub unsafe extern "C" fn execvpe(file: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    // SAFETY: the caller's contract.
    unsafe {
        run_exec(envp, |e| match real_fn::<ExecveFn>(EXECVPE) {
            Some(f) => f(file, argv, e),
            None => enosys(),
        })
    }
}

/// `execvp(3)` (glibc's is `execvpe` with `environ`).
///
/// # Safety
///
/// The arguments of `execvp(3)`.
#[no_mangle]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: the caller's contract; `environ` is the process environment.
    unsafe { execvpe(file, argv, environ) }
}

/// `fexecve(3)`.
///
/// # Safety
///
/// The arguments of `fexecve(3)`.
#[no_mangle]
pub unsafe extern "C" fn fexecve(fd: c_int, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    // SAFETY: the caller's contract.
    unsafe {
        run_exec(envp, |e| match real_fn::<FexecveFn>(FEXECVE) {
            Some(f) => f(fd, argv, e),
            None => enosys(),
        })
    }
}

/// `execveat(2)`.
///
/// # Safety
///
/// The arguments of `execveat(2)`.
#[no_mangle]
pub unsafe extern "C" fn execveat(
    dirfd: c_int,
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    flags: c_int,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe {
        run_exec(envp, |e| match real_fn::<ExecveatFn>(EXECVEAT) {
            Some(f) => f(dirfd, path, argv, e, flags),
            None => textpoke_sys::process::execveat(dirfd, path, argv, e, flags),
        })
    }
}

/// What an `execl`-family stub stands for.
const KIND_EXECL: c_int = 0;
const KIND_EXECLP: c_int = 1;
const KIND_EXECLE: c_int = 2;

/// The argument registers after `path` that the `execl` stubs store:
/// rsi, rdx, rcx, r8, r9 (x86-64), x1–x7 (aarch64; variadic arguments are
/// passed as named ones by the Linux AAPCS64).
#[cfg(target_arch = "x86_64")]
const EXECL_REG_ARGS: usize = 5;
#[cfg(target_arch = "aarch64")]
const EXECL_REG_ARGS: usize = 7;

/// The common part of the `execl` stubs: `regs` holds the variadic
/// arguments that came in registers (the 2nd to 6th on x86-64, to 8th on
/// aarch64), `stack` points to the ones on the stack (the next on).
///
/// # Safety
///
/// Called only by the stubs below, from a C call of `execl(3)`,
/// `execlp(3)` or `execle(3)`: a NULL-terminated list of C strings (then,
/// for `execle`, an environment).
unsafe extern "C" fn execl_impl(path: *const c_char, regs: *const usize, stack: *const usize, kind: c_int) -> c_int {
    // SAFETY: the caller's contract: the list is readable up to its NULL
    // (and the environment pointer after it for execle).
    let arg = |i: usize| unsafe {
        if i < EXECL_REG_ARGS {
            *regs.add(i)
        } else {
            *stack.add(i - EXECL_REG_ARGS)
        }
    };
    let mut n = 0;
    while arg(n) != 0 {
        n += 1;
    }
    // SAFETY: `environ` is the process environment.
    let envp = if kind == KIND_EXECLE { arg(n + 1) as *const *const c_char } else { unsafe { environ } };
    let Some(mut mem) = Scratch::new((n + 1) * 8) else {
        set_errno(libc::ENOMEM);
        return -1;
    };
    let argv = mem.slots(n + 1);
    for i in 0..=n {
        // SAFETY: i <= n < n + 1 slots; arg(n) is the NULL.
        unsafe { *argv.add(i) = arg(i) as *const c_char };
    }
    // SAFETY: the caller's contract.
    let r = unsafe {
        if kind == KIND_EXECLP {
            execvpe(path, argv, envp)
        } else {
            execve(path, argv, envp)
        }
    };
    let e = errno();
    drop(mem);
    set_errno(e);
    r
}

macro_rules! execl_stub {
    ($name:ident, $kind:expr) => {
        /// The `execl`-family function of this name (variadic in C): see
        /// the module docs.
        ///
        /// # Safety
        ///
        /// Called from C with the arguments of the libc function.
        #[cfg(target_arch = "x86_64")]
        #[unsafe(naked)]
        #[no_mangle]
        pub unsafe extern "C" fn $name(path: *const c_char, arg0: *const c_char) -> c_int {
            // Entry: rsp = 8 mod 16. 56 bytes keep the call aligned; the
            // five register arguments go to [rsp, rsp + 40); the stack
            // arguments start above the return address, at rsp + 64.
            core::arch::naked_asm!(
                "sub rsp, 56",
                "mov [rsp], rsi",
                "mov [rsp + 8], rdx",
                "mov [rsp + 16], rcx",
                "mov [rsp + 24], r8",
                "mov [rsp + 32], r9",
                "mov rsi, rsp",
                "lea rdx, [rsp + 64]",
                "mov ecx, {kind}",
                "call {imp}",
                "add rsp, 56",
                "ret",
                kind = const $kind,
                imp = sym execl_impl,
            )
        }

        /// The `execl`-family function of this name (variadic in C): see
        /// the module docs.
        ///
        /// # Safety
        ///
        /// Called from C with the arguments of the libc function.
        #[cfg(target_arch = "aarch64")]
        #[unsafe(naked)]
        #[no_mangle]
        pub unsafe extern "C" fn $name(path: *const c_char, arg0: *const c_char) -> c_int {
            // A frame record at [sp+64] (x29, x30), the seven register
            // arguments x1-x7 at [sp, sp+56); sp stays 16-aligned. The
            // stack arguments start at the entry sp, sp+80.
            core::arch::naked_asm!(
                "sub sp, sp, #80",
                "stp x29, x30, [sp, #64]",
                "add x29, sp, #64",
                "stp x1, x2, [sp]",
                "stp x3, x4, [sp, #16]",
                "stp x5, x6, [sp, #32]",
                "str x7, [sp, #48]",
                "mov x1, sp",
                "add x2, sp, #80",
                "mov w3, #{kind}",
                "bl {imp}",
                "ldp x29, x30, [sp, #64]",
                "add sp, sp, #80",
                "ret",
                kind = const $kind,
                imp = sym execl_impl,
            )
        }
    };
}

execl_stub!(execl, KIND_EXECL);
execl_stub!(execlp, KIND_EXECLP);
execl_stub!(execle, KIND_EXECLE);

// ---------------------------------------------------------------------------
// _exit.

/// Finishes the trace before an `_exit` of the agent's own process (not
/// a `vfork` child), without doing any of the work on this thread: see
/// the module docs. Async-signal-safe.
fn before_exit() {
    if !own_process() || !crate::recording() {
        return;
    }
    if !server::exit::stop_for_exit() {
        note_unfinished_at_exit();
    }
    server::socket::remove_socket();
}

/// Says on stderr that the trace is left incomplete, with `write(2)`
/// (async-signal-safe, unlike the agent's other messages).
#[cold] // only when the agent thread could not finish the trace in time
fn note_unfinished_at_exit() {
    const MSG: &[u8] = b"textpoke: the trace could not be finished at _exit (the agent thread did not answer; \
        was _exit called from a signal handler?); it is left incomplete\n";
    textpoke_sys::write_stderr(MSG);
}

fn real_exit(status: c_int) -> ! {
    if let Some(f) = real_fn::<unsafe extern "C" fn(c_int) -> !>(EXIT) {
        // SAFETY: libc's _exit.
        unsafe { f(status) }
    }
    textpoke_sys::process::exit_group(status)
}

/// `_exit(2)`, after the agent thread stopped the recorder.
#[no_mangle]
pub extern "C" fn _exit(status: c_int) -> ! {
    before_exit();
    real_exit(status)
}

/// `_Exit(3)`, after the agent thread stopped the recorder.
#[no_mangle]
pub extern "C" fn _Exit(status: c_int) -> ! {
    before_exit();
    real_exit(status)
}

// ---------------------------------------------------------------------------
// dlopen, dlclose.

/// Wakes the agent thread, returns the real `dlopen` to jump to.
extern "C" fn on_dlopen() -> usize {
    if LOADED.load(Ordering::Acquire) && !in_agent() && own_process() {
        as_agent(server::loader::nudge);
    }
    match real(DLOPEN) {
        0 => dlopen_unavailable as *const () as usize,
        p => p,
    }
}

extern "C" fn dlopen_unavailable(_file: *const c_char, _mode: c_int) -> *mut c_void {
    std::ptr::null_mut()
}

/// `dlopen(3)`: wakes the agent thread, then jumps to the real one with
/// the caller's return address in place (see the module docs).
///
/// # Safety
///
/// The arguments of `dlopen(3)`.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn dlopen(file: *const c_char, mode: c_int) -> *mut c_void {
    // Entry: rsp = 8 mod 16; two pushes and 8 bytes keep the call aligned.
    core::arch::naked_asm!(
        "push rdi",
        "push rsi",
        "sub rsp, 8",
        "call {hook}",
        "add rsp, 8",
        "pop rsi",
        "pop rdi",
        "jmp rax",
        hook = sym on_dlopen,
    )
}

/// `dlopen(3)`: wakes the agent thread, then branches to the real one with
/// the caller's return address back in x30 (see the module docs).
///
/// # Safety
///
/// The arguments of `dlopen(3)`.
#[cfg(target_arch = "aarch64")]
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn dlopen(file: *const c_char, mode: c_int) -> *mut c_void {
    // A frame record (x29, x30) and the two arguments; then x29, x30, x0
    // and x1 as they came, and `br x16`, which a `bti c` at the real
    // dlopen's entry accepts (x16/x17 are the branch registers for it).
    core::arch::naked_asm!(
        "stp x29, x30, [sp, #-32]!",
        "mov x29, sp",
        "stp x0, x1, [sp, #16]",
        "bl {hook}",
        "mov x16, x0",
        "ldp x0, x1, [sp, #16]",
        "ldp x29, x30, [sp], #32",
        "br x16",
        hook = sym on_dlopen,
    )
}

/// `dlclose(3)`, then a rescan so the unloaded object's sites are
/// forgotten at once. The agent's lock is not held across the real call:
/// the tracer pins every object whose code it patches for the length of a
/// commit, and forgets the sites of an object it can no longer pin, so a
/// commit never races the unmap. Nor is the lock waited for afterwards:
/// this thread may hold the loader's lock (a destructor or constructor
/// calling dlclose), which the agent thread's own rescan needs; if the
/// agent is busy, its thread is nudged to rescan instead.
///
/// # Safety
///
/// The argument of `dlclose(3)`.
#[no_mangle]
pub unsafe extern "C" fn dlclose(handle: *mut c_void) -> c_int {
    let Some(f) = real_fn::<unsafe extern "C" fn(*mut c_void) -> c_int>(DLCLOSE) else {
        return -1;
    };
    let tracing = LOADED.load(Ordering::Acquire) && STARTED.load(Ordering::Acquire);
    if !tracing || in_agent() || !own_process() {
        // SAFETY: the caller's contract.
        return unsafe { f(handle) };
    }
    let (mut r, mut called) = (-1, false);
    as_agent(|| {
        called = true;
        // SAFETY: the caller's contract. Destructors run inside, on this
        // thread, marked as agent code: their own dlopen/dlclose calls pass
        // straight through.
        r = unsafe { f(handle) };
        if r == 0 {
            match AGENT.try_lock() {
                Some(mut g) => {
                    if let Some(a) = g.as_mut() {
                        crate::refresh(a);
                    }
                }
                None => server::loader::nudge(),
            }
            // The rescan's own loader calls may have left an error message;
            // the program's dlclose succeeded, so dlerror() must say nothing.
            // SAFETY: no preconditions.
            unsafe { libc::dlerror() };
        }
    });
    if !called {
        // SAFETY: as above (the wrapper failed before calling it).
        return unsafe { f(handle) };
    }
    r
}
