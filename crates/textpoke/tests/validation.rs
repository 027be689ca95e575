//! Bad input: every refusal of a batch is a typed error naming the site,
//! and nothing of the batch is written. Good batches leave no page
//! writable and executable and restore every page's protection.
//!
//! The tests that speak x86-64 bytes run there; module `aarch64` below has
//! the same refusals in aarch64 words (run under qemu by `.ci/aarch64`).
//! Not on aarch64: `not_at_instruction_boundary_is_refused` (every aligned
//! word starts an instruction there: a misaligned poke is refused as not
//! one instruction, tested below) and `first_byte_pokes_...` (gcc's x86
//! pads; an aarch64 pad is whole words).

mod common;

#[cfg(target_arch = "x86_64")]
use common::{compile_so, Lib};
use common::{peek, perms_at};
#[cfg(target_arch = "x86_64")]
use textpoke::arch::{encode_call, encode_jmp, NOP5};
use textpoke::stress::{CodeMap, Layout, SiteArena};
use textpoke::{Batch, CommitOptions, Poke, PokeError, Strategy};

/// A disabled site of a `Layout::Single` arena.
const OFF: &[u8] = &textpoke::arch::SITE_NOP;

/// A batch of one good poke (site 0 on) plus `bad`; asserts the commit is
/// refused with an error matching `check`, and that site 0 is untouched.
fn refused(arena: &SiteArena, bad: Poke, strategy: Strategy, check: impl Fn(&PokeError) -> bool) -> String {
    let before = peek(arena.site(0), OFF.len());
    let bad_before = peek(bad.addr(), bad.len()).to_vec();
    let mut b = Batch::new();
    b.push(arena.poke(0, true)).push(bad);
    let err = b.commit_with(CommitOptions::strategy(strategy)).expect_err("batch must be refused");
    assert!(check(&err), "unexpected error: {err:?}");
    assert_eq!(peek(arena.site(0), OFF.len()), before, "the good poke of a refused batch was written");
    assert_eq!(peek(b.pokes()[1].addr(), b.pokes()[1].len()), bad_before, "the refused poke wrote bytes");
    err.to_string()
}

fn arena() -> SiteArena {
    SiteArena::new(8, Layout::Single).unwrap()
}

#[cfg(target_arch = "x86_64")]
#[test]
fn mismatch_names_address_expected_and_found() {
    let a = arena();
    let bad = Poke::new(a.site(1), [0xe8, 1, 2, 3, 4], NOP5).named("site one");
    let msg =
        refused(&a, bad, Strategy::Breakpoint, |e| matches!(e, PokeError::Mismatch { found, .. } if found == &NOP5));
    assert!(msg.contains("site one") && msg.contains("e8 01 02 03 04") && msg.contains("0f 1f 44 00 00"), "{msg}");
    assert!(msg.contains(&format!("{:#x}", a.site(1))), "{msg}");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn unmapped_address_is_refused() {
    let a = arena();
    // A page we map and unmap again, so nothing is there.
    let gone = CodeMap::new(&[0x90; 16]).unwrap();
    let addr = gone.addr();
    drop(gone);
    let mut b = Batch::new();
    b.push(a.poke(0, true)).push(Poke::new(addr, NOP5, NOP5));
    let err = b.commit().unwrap_err();
    assert!(matches!(err, PokeError::NotMapped { .. }), "{err:?}");
    assert_eq!(peek(a.site(0), 5), NOP5);
    assert!(err.to_string().contains("not mapped"));
}

#[cfg(target_arch = "x86_64")]
#[test]
fn non_executable_address_is_refused() {
    let a = arena();
    static DATA: [u8; 5] = NOP5;
    let addr = DATA.as_ptr() as usize;
    let msg = refused(&a, Poke::new(addr, NOP5, [0xe9, 0, 0, 0, 0]), Strategy::Breakpoint, |e| {
        matches!(e, PokeError::NotExecutable { .. })
    });
    assert!(msg.contains("not executable"), "{msg}");
    let stack = [0x90u8; 5];
    refused(&a, Poke::new(stack.as_ptr() as usize, [0x90; 5], NOP5), Strategy::StopMachine, |e| {
        matches!(e, PokeError::NotExecutable { .. })
    });
}

#[cfg(target_arch = "x86_64")]
#[test]
fn not_one_instruction_is_refused() {
    let a = arena();
    // Five one-byte NOPs are five instructions: rule 1.
    let code = CodeMap::new(&[0x90, 0x90, 0x90, 0x90, 0x90, 0xc3]).unwrap();
    let call = encode_call(code.addr(), a.trampoline()).unwrap();
    let msg = refused(&a, Poke::new(code.addr(), [0x90; 5], call), Strategy::Breakpoint, |e| {
        matches!(e, PokeError::NotOneInstruction { which: "expected", .. })
    });
    assert!(msg.contains("not exactly one instruction"), "{msg}");
    // New bytes that are not one instruction either.
    refused(&a, Poke::new(a.site(2), NOP5, [0x90, 0x90, 0x90, 0x90, 0x90]), Strategy::StopMachine, |e| {
        matches!(e, PokeError::NotOneInstruction { which: "new", .. })
    });
    // A region poke whose new bytes cut an instruction.
    refused(&a, Poke::region(code.addr(), [0x90; 5], [0x90, 0x90, 0x0f, 0x1f, 0x44]), Strategy::StopMachine, |e| {
        matches!(e, PokeError::NotWholeInstructions { which: "new", .. })
    });
}

#[cfg(target_arch = "x86_64")]
#[test]
fn overlapping_and_malformed_pokes_are_refused() {
    let a = arena();
    let s = a.site(3);
    let mut b = Batch::new();
    b.push(a.poke(0, true)).push(a.poke(3, true)).push(Poke::new(s + 2, [0x44, 0x00], [0x44, 0x00]));
    assert!(matches!(b.commit().unwrap_err(), PokeError::Overlap { .. }));
    let mut b = Batch::new();
    b.push(a.poke(0, true)).push(Poke::new(s, NOP5, [0xe9, 0, 0, 0]));
    assert!(matches!(b.commit().unwrap_err(), PokeError::LengthMismatch { .. }));
    let mut b = Batch::new();
    b.push(a.poke(0, true)).push(Poke::new(s, [], []));
    assert!(matches!(b.commit().unwrap_err(), PokeError::Empty { .. }));
    assert_eq!(peek(a.site(0), 5), NOP5);
    assert_eq!(peek(s, 5), NOP5);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn breakpoint_refuses_what_it_cannot_emulate_and_regions() {
    let a = arena();
    let mov = [0xb8, 1, 0, 0, 0]; // mov eax, 1
    let msg = refused(&a, Poke::new(a.site(4), NOP5, mov), Strategy::Breakpoint, |e| {
        matches!(e, PokeError::NotEmulatable { .. })
    });
    assert!(msg.contains("stop-machine"), "{msg}");
    let r = SiteArena::new(2, Layout::Region).unwrap();
    refused(&a, r.poke(0, true), Strategy::Breakpoint, |e| matches!(e, PokeError::RegionNeedsStopMachine { .. }));
    // Stop-machine may write it, and back.
    let p = Poke::new(a.site(4), NOP5, mov);
    Batch::from_iter([p.clone()]).commit_with(CommitOptions::strategy(Strategy::StopMachine)).unwrap();
    assert_eq!(peek(a.site(4), 5), mov);
    Batch::from_iter([p.reversed()]).commit_with(CommitOptions::strategy(Strategy::StopMachine)).unwrap();
    assert_eq!(peek(a.site(4), 5), NOP5);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn not_at_instruction_boundary_is_refused() {
    // tp_misaligned: `mov eax, 0x90909090; ret` — byte 1 is a valid
    // one-byte NOP, but inside the MOV.
    let so = compile_so(
        "boundary",
        r#"__asm__(".globl tp_misaligned\n.type tp_misaligned,@function\ntp_misaligned:\n"
                   "  movl $0x90909090, %eax\n  ret\n.size tp_misaligned, .-tp_misaligned\n");"#,
        &[],
    );
    let lib = Lib::open(&so);
    let f = lib.sym("tp_misaligned");
    let a = arena();
    let msg = refused(&a, Poke::new(f + 1, [0x90], [0x90]), Strategy::Breakpoint, |e| {
        matches!(e, PokeError::NotAtBoundary { .. })
    });
    assert!(msg.contains("tp_misaligned"), "names the function: {msg}");
    assert!(msg.contains("tp_misaligned+0x1"), "names the offset: {msg}");
}

#[test]
fn commits_leave_no_wx_page_and_restore_protection() {
    let a = arena();
    let before = perms_at(a.site(0));
    assert_eq!(before, "r-xp");
    for strategy in [Strategy::Breakpoint, Strategy::StopMachine] {
        let st = a.batch(true).commit_with(CommitOptions::strategy(strategy)).unwrap();
        assert_eq!(st.written, 8);
        assert_eq!(perms_at(a.site(0)), before);
        // (Other tests of this process commit concurrently, so only our
        // pages are checked here; tests/processes.rs checks every mapping.)
        assert!(!perms_at(a.site(7)).starts_with("rwx"));
        a.batch(false).commit_with(CommitOptions::strategy(strategy)).unwrap();
        assert_eq!(peek(a.site(7), OFF.len()), OFF);
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn breakpoint_batches_take_three_sync_rounds_at_any_size() {
    let a = SiteArena::new(3000, Layout::Single).unwrap();
    for n in [1usize, 100, 3000] {
        let on: Batch = (0..n).map(|i| a.poke(i, true)).collect();
        let st = on.commit().unwrap();
        assert_eq!((st.sync_rounds, st.written), (3, n));
        let off: Batch = (0..n).map(|i| a.poke(i, false)).collect();
        assert_eq!(off.commit().unwrap().sync_rounds, 3);
    }
    // A batch whose pokes change nothing writes nothing and syncs nothing.
    let noop: Batch = (0..10).map(|i| Poke::new(a.site(i), NOP5, NOP5)).collect();
    let st = noop.commit().unwrap();
    assert_eq!((st.sync_rounds, st.written), (0, 0));
}

#[cfg(target_arch = "x86_64")]
#[test]
fn jmp_and_call_sites_behave() {
    // A function returning 1, whose entry NOP can become a JMP to one
    // returning 2 (the live-patching shape).
    let code = CodeMap::new(&[
        0x0f, 0x1f, 0x44, 0x00, 0x00, 0xb8, 1, 0, 0, 0, 0xc3, // f: nop5; mov eax,1; ret
        0xb8, 2, 0, 0, 0, 0xc3, // g: mov eax,2; ret
    ])
    .unwrap();
    let (f, g) = (code.addr(), code.addr() + 11);
    // SAFETY: f is the function just mapped.
    let call = || unsafe { std::mem::transmute::<usize, extern "C" fn() -> i32>(f)() };
    assert_eq!(call(), 1);
    let jmp = encode_jmp(f, g).unwrap();
    Batch::from_iter([Poke::new(f, NOP5, jmp)]).commit().unwrap();
    assert_eq!(call(), 2);
    Batch::from_iter([Poke::new(f, jmp, NOP5)]).commit().unwrap();
    assert_eq!(call(), 1);
}

#[test]
fn concurrent_commits_are_serialised() {
    // 8 threads each flip their own sites 200 times; each commit must see
    // exactly the bytes it expects, so a lost or torn commit would fail.
    let a = std::sync::Arc::new(SiteArena::new(64, Layout::Single).unwrap());
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let a = a.clone();
            std::thread::spawn(move || {
                for round in 0..200 {
                    let on = round % 2 == 0;
                    let b: Batch = (t * 8..t * 8 + 8).map(|i| a.poke(i, on)).collect();
                    b.commit().unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for i in 0..64 {
        assert_eq!(peek(a.site(i), OFF.len()), OFF);
    }
}

/// `Poke::first_byte` (gcc's pad enabled by its first byte): accepted when
/// only the first byte differs between whole instructions, in either
/// direction, by the breakpoint protocol; refused when a later byte
/// differs or a side is not whole instructions, with nothing written.
#[cfg(target_arch = "x86_64")]
#[test]
fn first_byte_pokes_change_the_first_byte_only() {
    let a = arena();
    const PAD: [u8; 5] = [0x90; 5];
    const PAD_JMP: [u8; 5] = [0xe9, 0x90, 0x90, 0x90, 0x90];
    let code = CodeMap::new(&[0x90, 0x90, 0x90, 0x90, 0x90, 0xc3]).unwrap();
    let at = code.addr();
    // A later byte differs: refused.
    let msg = refused(&a, Poke::first_byte(at, PAD, [0xe9, 0x90, 0x90, 0x90, 0x91]), Strategy::Breakpoint, |e| {
        matches!(e, PokeError::TailChanged { .. })
    });
    assert!(msg.contains("first byte only") && msg.contains("e9 90 90 90 91"), "{msg}");
    // The new bytes are not whole instructions (0f 90 /r wants more bytes).
    refused(&a, Poke::first_byte(at, PAD, [0x0f, 0x90, 0x90, 0x90, 0x90]), Strategy::Breakpoint, |e| {
        matches!(e, PokeError::NotWholeInstructions { which: "new", .. })
    });
    // The expected bytes are not what is there.
    refused(&a, Poke::first_byte(at, PAD_JMP, PAD), Strategy::Breakpoint, |e| matches!(e, PokeError::Mismatch { .. }));
    // Poke::new still refuses the pad (five instructions), rule 1.
    refused(&a, Poke::new(at, PAD, PAD_JMP), Strategy::Breakpoint, |e| {
        matches!(e, PokeError::NotOneInstruction { which: "expected", .. })
    });
    // Accepted both ways, by the breakpoint protocol (three syncs); the
    // jump is never run.
    let on = Poke::first_byte(at, PAD, PAD_JMP);
    let st = Batch::from_iter([on.clone()]).commit().unwrap();
    assert_eq!((st.written, st.sync_rounds), (1, 3));
    assert_eq!(peek(at, 6), [0xe9, 0x90, 0x90, 0x90, 0x90, 0xc3]);
    Batch::from_iter([on.reversed()]).commit().unwrap();
    assert_eq!(peek(at, 6), [0x90, 0x90, 0x90, 0x90, 0x90, 0xc3]);
    assert!(on.is_first_byte() && !on.is_region());
    // And by stop-machine.
    Batch::from_iter([on.clone()]).commit_with(CommitOptions::strategy(Strategy::StopMachine)).unwrap();
    assert_eq!(peek(at, 5), PAD_JMP);
    Batch::from_iter([on.reversed()]).commit_with(CommitOptions::strategy(Strategy::StopMachine)).unwrap();
    assert_eq!(peek(at, 5), PAD);
}

/// The refusals above in aarch64 words: every instruction one aligned
/// word, the live strategy a swap of B/BL/NOP words (`text/swap_aarch64.rs`).
#[cfg(target_arch = "aarch64")]
mod aarch64 {
    use super::*;
    use textpoke::arch::{encode_call, encode_jmp, NOP};

    const NOP_WORD: u32 = u32::from_le_bytes(NOP);
    /// `mov x9, x30` and `mov x30, x9` (the LR-preserving pair), `ret`.
    const MOV_X9_X30: u32 = 0xaa1e_03e9;
    const MOV_X30_X9: u32 = 0xaa09_03fe;
    const RET: u32 = 0xd65f_03c0;
    /// `mov w0, #1` and `mov w0, #2`.
    const MOV_W0_1: u32 = 0x5280_0020;
    const MOV_W0_2: u32 = 0x5280_0040;

    fn words(ws: &[u32]) -> Vec<u8> {
        ws.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    #[test]
    fn mismatch_names_address_expected_and_found() {
        let a = arena();
        let bl = encode_call(a.site(1), a.trampoline()).unwrap();
        let bad = Poke::new(a.site(1), bl, NOP).named("site one");
        let msg =
            refused(&a, bad, Strategy::Breakpoint, |e| matches!(e, PokeError::Mismatch { found, .. } if found == &NOP));
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ");
        assert!(msg.contains("site one") && msg.contains(&hex(&bl)) && msg.contains("1f 20 03 d5"), "{msg}");
        assert!(msg.contains(&format!("{:#x}", a.site(1))), "{msg}");
    }

    #[test]
    fn unmapped_and_non_executable_addresses_are_refused() {
        let a = arena();
        let gone = CodeMap::new(&words(&[NOP_WORD; 4])).unwrap();
        let addr = gone.addr();
        drop(gone);
        let mut b = Batch::new();
        b.push(a.poke(0, true)).push(Poke::new(addr, NOP, NOP));
        let err = b.commit().unwrap_err();
        assert!(matches!(err, PokeError::NotMapped { .. }), "{err:?}");
        assert_eq!(peek(a.site(0), 4), NOP);

        #[repr(align(4))]
        struct Word([u8; 4]);
        // On the heap (aarch64's GNU ld puts .rodata in the executable
        // segment by default, so a static would be executable).
        let data = Box::new(Word(NOP));
        let at = data.0.as_ptr() as usize;
        let b_self = encode_jmp(at, at).unwrap();
        let msg = refused(&a, Poke::new(at, NOP, b_self), Strategy::Breakpoint, |e| {
            matches!(e, PokeError::NotExecutable { .. })
        });
        assert!(msg.contains("not executable"), "{msg}");
        let stack = Word(NOP);
        refused(&a, Poke::new(stack.0.as_ptr() as usize, NOP, NOP), Strategy::StopMachine, |e| {
            matches!(e, PokeError::NotExecutable { .. })
        });
    }

    #[test]
    fn misaligned_or_not_one_word_is_refused() {
        let a = arena();
        let code = CodeMap::new(&words(&[NOP_WORD, NOP_WORD, NOP_WORD, RET])).unwrap();
        // Not 4-byte aligned: in the middle of an instruction.
        let msg = refused(&a, Poke::new(code.addr() + 2, [0x03, 0xd5, 0x1f, 0x20], NOP), Strategy::Breakpoint, |e| {
            matches!(e, PokeError::NotOneInstruction { which: "expected", .. })
        });
        assert!(msg.contains("not 4-byte aligned"), "{msg}");
        // Two words are two instructions (rule 1): only a region may hold them.
        let two = words(&[NOP_WORD, NOP_WORD]);
        let msg = refused(
            &a,
            Poke::new(code.addr(), two.clone(), words(&[MOV_X9_X30, NOP_WORD])),
            Strategy::StopMachine,
            |e| matches!(e, PokeError::NotOneInstruction { which: "expected", .. }),
        );
        assert!(msg.contains("aarch64 instructions are 4"), "{msg}");
        // A region of six bytes cuts a word.
        refused(&a, Poke::region(code.addr(), &two[..6], &two[..6]), Strategy::StopMachine, |e| {
            matches!(e, PokeError::NotWholeInstructions { which: "expected", .. })
        });
        assert_eq!(code.bytes(0, 16), words(&[NOP_WORD, NOP_WORD, NOP_WORD, RET]));
    }

    #[test]
    fn overlapping_and_malformed_pokes_are_refused() {
        let a = arena();
        let s = a.site(3);
        let mut b = Batch::new();
        b.push(a.poke(0, true)).push(a.poke(3, true)).push(Poke::region(
            s,
            words(&[NOP_WORD, MOV_X30_X9]),
            words(&[NOP_WORD, MOV_X30_X9]),
        ));
        assert!(matches!(b.commit().unwrap_err(), PokeError::Overlap { .. }));
        let mut b = Batch::new();
        b.push(a.poke(0, true)).push(Poke::new(s, NOP, [0x1f, 0x20, 0x03]));
        assert!(matches!(b.commit().unwrap_err(), PokeError::LengthMismatch { .. }));
        let mut b = Batch::new();
        b.push(a.poke(0, true)).push(Poke::new(s, [], []));
        assert!(matches!(b.commit().unwrap_err(), PokeError::Empty { .. }));
        assert_eq!(peek(a.site(0), 4), NOP);
        assert_eq!(peek(s, 4), NOP);
    }

    #[test]
    fn the_swap_refuses_what_is_not_swappable_and_stop_machine_writes_it() {
        let a = arena();
        let mov = MOV_X9_X30.to_le_bytes();
        let msg = refused(&a, Poke::new(a.site(4), NOP, mov), Strategy::Breakpoint, |e| {
            matches!(e, PokeError::NotSwappable { .. } | PokeError::NotEmulatable { .. })
        });
        assert!(msg.contains("stop-machine"), "says what would do: {msg}");
        let r = SiteArena::new(2, Layout::Region).unwrap();
        refused(&a, r.poke(0, true), Strategy::Breakpoint, |e| matches!(e, PokeError::RegionNeedsStopMachine { .. }));
        // Stop-machine may write it (the one-time NOP->MOV of a pad), and back.
        let p = Poke::new(a.site(4), NOP, mov);
        Batch::from_iter([p.clone()]).commit_with(CommitOptions::strategy(Strategy::StopMachine)).unwrap();
        assert_eq!(peek(a.site(4), 4), mov);
        Batch::from_iter([p.reversed()]).commit_with(CommitOptions::strategy(Strategy::StopMachine)).unwrap();
        assert_eq!(peek(a.site(4), 4), NOP);
    }

    #[test]
    fn swap_batches_take_one_sync_round_at_any_size() {
        let a = SiteArena::new(3000, Layout::Single).unwrap();
        for n in [1usize, 100, 3000] {
            let on: Batch = (0..n).map(|i| a.poke(i, true)).collect();
            let st = on.commit().unwrap();
            assert_eq!((st.sync_rounds, st.written, st.traps), (1, n, 0));
            let off: Batch = (0..n).map(|i| a.poke(i, false)).collect();
            assert_eq!(off.commit().unwrap().sync_rounds, 1);
        }
        // A batch whose pokes change nothing writes nothing and syncs nothing.
        let noop: Batch = (0..10).map(|i| Poke::new(a.site(i), NOP, NOP)).collect();
        let st = noop.commit().unwrap();
        assert_eq!((st.sync_rounds, st.written), (0, 0));
    }

    #[test]
    fn b_and_bl_sites_behave() {
        // f: nop; mov w0, #1; ret    g: mov w0, #2; ret. The NOP becomes
        // `b g` (the live-patching shape).
        let code = CodeMap::new(&words(&[NOP_WORD, MOV_W0_1, RET, MOV_W0_2, RET])).unwrap();
        let (f, g) = (code.addr(), code.addr() + 12);
        // SAFETY: f is the function just mapped.
        let call = || unsafe { std::mem::transmute::<usize, extern "C" fn() -> i32>(f)() };
        assert_eq!(call(), 1);
        let b = encode_jmp(f, g).unwrap();
        Batch::from_iter([Poke::new(f, NOP, b)]).commit().unwrap();
        assert_eq!(call(), 2);
        Batch::from_iter([Poke::new(f, b, NOP)]).commit().unwrap();
        assert_eq!(call(), 1);
        // Out of BL's reach (+-128 MiB) there is no encoding.
        assert!(encode_call(f, f + (128 << 20)).is_none());
    }
}
