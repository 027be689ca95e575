//! Seed 001's hazard, reproduced on purpose: trampolines and op data are
//! freed only after every thread was seen outside them.

mod common;

use common::{child_scenario, compile_so, peek, rerun_self, Lib};
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;
use textpoke::stress::CodeMap;
use textpoke::trace::{wait_for_grace, Entry, Filter, TraceOp, Tracer};

/// An op whose callback holds the calling thread until released.
struct Holder {
    armed: AtomicBool,
    inside: AtomicBool,
    release: AtomicBool,
}

impl TraceOp for Holder {
    fn entry(&self, _e: &Entry<'_>) {
        if self.armed.swap(false, Ordering::AcqRel) {
            self.inside.store(true, Ordering::Release);
            while !self.release.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
        }
    }
}

fn mapped(addr: usize) -> bool {
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().any(|l| {
        let (s, e) = l.split_whitespace().next().unwrap().split_once('-').unwrap();
        let (s, e) = (usize::from_str_radix(s, 16).unwrap(), usize::from_str_radix(e, 16).unwrap());
        s <= addr && addr < e
    })
}

/// Runs the scenario; returns whether the held thread came back.
fn held_thread_while_unregistering(grace: bool) -> bool {
    let lib = Arc::new(Lib::open(&compile_so(
        "hazard",
        "int haz_fn(int x) { return x + 1; }",
        &["-fpatchable-function-entry=5", "-O1"],
    )));
    let t = Tracer::global();
    t.refresh().unwrap();
    t.set_grace_period_for_tests(grace);
    let op = Arc::new(Holder {
        armed: AtomicBool::new(true),
        inside: AtomicBool::new(false),
        release: AtomicBool::new(false),
    });
    let h = t.register(op.clone(), Filter::new(["haz_fn"], Vec::<String>::new()).unwrap()).unwrap();
    let f = lib.sym("haz_fn");
    let call = peek(f, 5);
    assert_eq!(call[0], 0xe8);
    let stub = (f as i64 + 5 + i32::from_le_bytes(call[1..].try_into().unwrap()) as i64) as usize;
    let lib2 = lib.clone();
    let held = std::thread::spawn(move || {
        // SAFETY: haz_fn's signature.
        let haz = unsafe { std::mem::transmute::<usize, extern "C" fn(i32) -> i32>(lib2.sym("haz_fn")) };
        haz(41)
    });
    while !op.inside.load(Ordering::Acquire) {
        std::thread::yield_now();
    }
    // The thread is inside the callback: a return into the trampoline is on
    // its stack. Unregister the op.
    t.unregister(h).unwrap();
    assert_eq!(peek(f, 5), textpoke::arch::NOP5);
    if grace {
        assert!(t.reclaim(Duration::from_millis(300)).unwrap() == 0, "nothing may be freed while the thread is held");
        assert!(t.retired() > 0);
        assert!(mapped(stub), "the trampoline block is still mapped");
    } else {
        assert!(!mapped(stub), "without a grace period the block is gone at once");
        println!("freed while held");
    }
    op.release.store(true, Ordering::Release);
    let r = held.join().unwrap();
    assert_eq!(r, 42);
    t.reclaim(Duration::from_secs(5)).unwrap();
    assert_eq!(t.retired(), 0, "freed once the thread moved on");
    assert!(!mapped(stub), "the trampoline block was unmapped");
    true
}

#[test]
fn child_entry() {
    if let Some(s) = child_scenario() {
        assert_eq!(s, "no-grace");
        held_thread_while_unregistering(false);
        println!("survived");
    }
}

#[test]
fn trampoline_is_not_freed_until_the_held_thread_moves_on() {
    assert!(held_thread_while_unregistering(true));
}

#[test]
fn without_a_grace_period_the_held_thread_crashes() {
    let out = rerun_self("child_entry", "no-grace");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("freed while held"), "{stdout}");
    assert!(!stdout.contains("survived"));
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "returned into unmapped trampoline: {:?}", out.status);
}

#[test]
fn a_thread_executing_inside_retired_code_blocks_the_grace_period() {
    // 1: cmp byte [rdi], 0; je 1b; ret — spins until *rdi != 0.
    let code = CodeMap::new(&[0x80, 0x3f, 0x00, 0x74, 0xfb, 0xc3]).unwrap();
    let range = [(code.addr(), code.addr() + 6)];
    let flag = Arc::new(AtomicU8::new(0));
    let (f2, addr) = (flag.clone(), code.addr());
    let spinner = std::thread::spawn(move || {
        // SAFETY: the code above, called with a pointer to a byte.
        let spin = unsafe { std::mem::transmute::<usize, extern "C" fn(*const u8)>(addr) };
        spin(f2.as_ptr());
    });
    std::thread::sleep(Duration::from_millis(20));
    let r = wait_for_grace(&range, Duration::from_millis(200));
    assert!(matches!(r, Ok(false)), "a thread's PC is inside: {r:?}");
    flag.store(1, Ordering::Release);
    spinner.join().unwrap();
    assert!(wait_for_grace(&range, Duration::from_secs(2)).unwrap());
}
