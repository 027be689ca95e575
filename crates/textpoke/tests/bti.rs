//! arm64 guarded pages (`PROT_BTI`) through a patch (issue 13): the
//! mprotect write method restores a page's protection from
//! `/proc/self/maps`, which does not show `PROT_BTI`; the page must keep
//! its guard anyway (text/write.rs, "Guarded pages"), and a page that had
//! none must not get one.
//!
//! The proof is behavioural: a forked child makes an indirect call (`blr`)
//! to an instruction that is not a landing pad, in the patched page; on a
//! guarded page that is a Branch Target exception (SIGILL), on an
//! unguarded one the call runs. qemu-aarch64 (`-cpu max`, its default)
//! enforces BTI like hardware; on a CPU without BTI these tests only
//! check that nothing is guarded.
//!
//! Debian's cross toolchain builds its crt files without the BTI property,
//! and ld keeps an object's property only when every input has it: the
//! guarded library is linked with `-nostartfiles` (it needs no
//! constructors), the "unmarked" one without, so its code holds `bti c`
//! but its pages are not guarded, as the loader decided.
#![cfg(target_arch = "aarch64")]

mod common;

use common::{compile_so, glob_filter, peek, EntryExitCounts, Lib, PATCHABLE};
use std::sync::atomic::Ordering;
use textpoke::{Batch, CommitOptions, Poke, Strategy, WriteMethod};
use textpoke_sys::bti::{self, Guarded};

const NOP: [u8; 4] = [0x1f, 0x20, 0x03, 0xd5];
const BTI_C: u32 = 0xd503_245f;

/// `bti c; nop; nop; add w0, w0, w0, lsl #1; add w0, w0, #1; ret` with
/// branch protection (gcc -O1), `nop; nop; add...` without.
const SRC: &str = "int tripled(int x) { return x * 3 + 1; }\n";

/// How a forked child's call ended.
#[derive(Debug, PartialEq, Eq)]
enum Call {
    Returned(i32),
    Signal(i32),
}

/// Calls `addr` as `int (*)(int)` with 2 (an indirect `blr`) in a forked
/// child, which exits with the result.
fn call_in_child(addr: usize) -> Call {
    // SAFETY: the child only calls the code under test and `_exit`s: no
    // lock, no allocation, nothing the other threads of the harness held.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // No core file for the expected fault (qemu-user still says
        // "core dumped": its message, not a file).
        let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: a valid rlimit; a system call, safe in a forked child.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) };
        // SAFETY: `addr` is code of a library loaded with this signature
        // (or, on purpose, an instruction inside it: the callers' point).
        let f = unsafe { std::mem::transmute::<usize, extern "C" fn(i32) -> i32>(addr) };
        let r = std::hint::black_box(f)(2);
        // SAFETY: ends the forked child without running the parent's atexit handlers.
        unsafe { libc::_exit(r) };
    }
    let mut status = 0;
    // SAFETY: our child; `status` is a valid out-pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    if libc::WIFSIGNALED(status) {
        Call::Signal(libc::WTERMSIG(status))
    } else {
        Call::Returned(libc::WEXITSTATUS(status))
    }
}

fn word(addr: usize) -> u32 {
    u32::from_le_bytes(peek(addr, 4).try_into().unwrap())
}

/// The ways a page gets written: the live swap and stop-machine with
/// mprotect, and /proc/self/mem (no protection change at all).
fn every_way() -> [CommitOptions; 3] {
    [
        CommitOptions { write: Some(WriteMethod::Mprotect), ..CommitOptions::strategy(Strategy::Breakpoint) },
        CommitOptions { write: Some(WriteMethod::Mprotect), ..CommitOptions::strategy(Strategy::StopMachine) },
        CommitOptions { write: Some(WriteMethod::ProcMem), ..CommitOptions::strategy(Strategy::Breakpoint) },
    ]
}

/// Patches the pad's first NOP of `entry`'s function (at `pad`) with
/// `b pad + 4` and back, `expect` checked on every call after each step.
fn patch_and_unpatch(pad: usize, opts: CommitOptions, check: impl Fn(&str)) {
    let b = textpoke::arch::encode_jmp(pad, pad + 4).unwrap();
    Batch::from_iter([Poke::new(pad, NOP, b)]).commit_with(opts).unwrap();
    assert_eq!(peek(pad, 4), b);
    check(&format!("patched ({opts:?})"));
    Batch::from_iter([Poke::new(pad, b, NOP)]).commit_with(opts).unwrap();
    assert_eq!(peek(pad, 4), NOP);
    check(&format!("unpatched ({opts:?})"));
}

#[test]
fn a_guarded_page_stays_guarded_through_patches() {
    let flags = [PATCHABLE, "-O1", "-mbranch-protection=standard", "-nostartfiles"];
    let lib = Lib::open(&compile_so("bti_guarded", SRC, &flags));
    let entry = lib.sym("tripled");
    assert_eq!(word(entry), BTI_C, "bti c first");
    let (pad, body) = (entry + 4, entry + 12);
    assert_eq!(peek(pad, 8), [NOP, NOP].concat());
    if !bti::supported() {
        eprintln!("no BTI in this CPU: checking only that nothing is guarded");
        assert!(Guarded::read().is_empty());
        assert_eq!(call_in_child(body), Call::Returned(7));
        return;
    }
    assert!(Guarded::read().contains(entry), "the loader guarded the object's code");
    let guarded = |when: &str| {
        assert_eq!(call_in_child(entry), Call::Returned(7), "a call to the landing pad, {when}");
        assert_eq!(
            call_in_child(body),
            Call::Signal(libc::SIGILL),
            "an indirect call past the landing pad must fault, {when}"
        );
    };
    guarded("before any patch");
    for opts in every_way() {
        patch_and_unpatch(pad, opts, guarded);
        assert!(Guarded::read().contains(entry), "still guarded after {opts:?}");
    }
}

#[test]
fn a_page_without_the_guard_never_gets_it() {
    // No branch protection at all; and `bti c` in the code but no BTI
    // property (the crt files lack it, module docs): neither is guarded.
    let plain = Lib::open(&compile_so("bti_plain", SRC, &[PATCHABLE, "-O1", "-mbranch-protection=none"]));
    let unmarked = Lib::open(&compile_so("bti_unmarked", SRC, &[PATCHABLE, "-O1", "-mbranch-protection=standard"]));
    for (lib, pad_at) in [(&plain, 0), (&unmarked, 4)] {
        let entry = lib.sym("tripled");
        assert_eq!(word(entry) == BTI_C, pad_at == 4);
        let (pad, body) = (entry + pad_at, entry + pad_at + 8);
        assert_eq!(peek(pad, 8), [NOP, NOP].concat());
        assert!(!Guarded::read().contains(entry), "an object without the BTI property is not guarded");
        let unguarded = |when: &str| {
            assert_eq!(call_in_child(body), Call::Returned(7), "an indirect call anywhere runs, {when}");
        };
        unguarded("before any patch");
        for opts in every_way() {
            patch_and_unpatch(pad, opts, unguarded);
            assert!(!Guarded::read().contains(entry), "not guarded after {opts:?}");
        }
    }
}

/// Two functions, the top one calling the leaf (a non-leaf: PAC signs its
/// return address).
const TRACED: &str = r#"
__attribute__((noinline)) int bt_leaf(int x) { return x * 3 + 1; }
int bt_top(int x) { return bt_leaf(x) + bt_leaf(x + 1); }
"#;

/// The tracer in guarded code: the sites branch to stubs and trampolines
/// in textpoke's unguarded blocks and come back (`b`, `ret`), the graph
/// exits' return trampoline included, with no landing pad of their own
/// (text/codemem.rs, "Never guarded"); the page stays guarded while traced
/// and after.
#[test]
fn the_tracer_runs_in_guarded_code() {
    let flags = [PATCHABLE, "-O1", "-mbranch-protection=standard", "-nostartfiles"];
    let lib = Lib::open(&compile_so("bti_traced", TRACED, &flags));
    let (top, leaf) = (lib.sym("bt_top"), lib.sym("bt_leaf"));
    assert_eq!((word(top), word(leaf)), (BTI_C, BTI_C));
    let guarded = bti::supported();
    assert_eq!(Guarded::read().contains(top), guarded);
    let past_the_pad = |when: &str| {
        let want = if guarded { Call::Signal(libc::SIGILL) } else { Call::Returned(7) };
        assert_eq!(call_in_child(leaf + 12), want, "a blr past the landing pad, {when}");
    };
    past_the_pad("before tracing");
    let t = textpoke::trace::Tracer::global();
    t.refresh().unwrap();
    let counts = EntryExitCounts::new();
    let h = t.register(counts.clone(), glob_filter(["bt_*"], Vec::<String>::new()).unwrap()).unwrap();
    assert_ne!(peek(top + 4, 4), NOP, "traced: the pad branches to its stub");
    // SAFETY: signature as in TRACED; a Rust call through a pointer is a `blr`.
    let bt_top = unsafe { std::mem::transmute::<usize, extern "C" fn(i32) -> i32>(top) };
    for _ in 0..100 {
        assert_eq!(std::hint::black_box(bt_top)(2), 7 + 10);
    }
    assert_eq!(call_in_child(top), Call::Returned(17), "a traced call in a child");
    past_the_pad("while traced");
    t.unregister(h).unwrap();
    assert_eq!(peek(top + 4, 8), [NOP, NOP].concat());
    assert_eq!((counts.entries.load(Ordering::Relaxed), counts.exits.load(Ordering::Relaxed)), (300, 300));
    past_the_pad("after tracing");
    assert_eq!(Guarded::read().contains(top), guarded);
}
