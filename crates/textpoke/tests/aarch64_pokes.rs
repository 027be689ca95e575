//! The poke engine on aarch64 (issue 13): the swap strategy (one atomic
//! word per site, one sync) and stop-machine for what is not swappable,
//! while 8 threads call the sites. Runs under qemu in `.ci/aarch64`; qemu
//! proves the function, not the memory model (see arch/aarch64.rs).
#![cfg(target_arch = "aarch64")]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use textpoke::stress::{Layout, SiteArena};
use textpoke::{CommitOptions, PokeError, Strategy};

const THREADS: usize = 8;

/// Runs `body` while THREADS threads call every site of `arena` in turn.
fn with_callers(arena: &Arc<SiteArena>, body: impl FnOnce()) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (arena, stop) = (arena.clone(), stop.clone());
            std::thread::spawn(move || {
                let counter = AtomicU64::new(0);
                let mut calls = 0u64;
                // Relaxed: a stop flag, nothing is read on its strength.
                while !stop.load(Ordering::Relaxed) {
                    arena.call((t + calls as usize) % arena.len(), &counter);
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    body();
    stop.store(true, Ordering::Relaxed);
    handles.into_iter().map(|h| h.join().expect("a caller crashed")).sum()
}

/// Calls every site once; how many counted (were enabled).
fn enabled_sites(arena: &SiteArena) -> u64 {
    let counter = AtomicU64::new(0);
    (0..arena.len()).for_each(|i| arena.call(i, &counter));
    counter.load(Ordering::Relaxed)
}

#[test]
fn swap_batches_flip_every_site_with_one_sync() {
    let arena = Arc::new(SiteArena::new(64, Layout::Single).unwrap());
    let opts = CommitOptions::strategy(Strategy::Breakpoint);
    let calls = with_callers(&arena, || {
        for round in 0..20 {
            let on = round % 2 == 0;
            let stats = arena.batch(on).commit_with(opts).unwrap();
            assert_eq!((stats.written, stats.sync_rounds, stats.traps), (64, 1, 0));
        }
    });
    assert!(calls > 0);
    assert_eq!(enabled_sites(&arena), 0, "the last batch turned every site off");
    arena.batch(true).commit_with(opts).unwrap();
    assert_eq!(enabled_sites(&arena), 64);
    for i in 0..64 {
        assert_eq!(arena.poke(i, true).expected(), textpoke::arch::NOP);
    }
}

#[test]
fn a_mov_is_not_swapped_live() {
    let arena = SiteArena::new(4, Layout::Region).unwrap();
    // The NOP→MOV rewrite of a pad: a region, refused by the live strategy.
    let err = arena.batch(true).commit_with(CommitOptions::strategy(Strategy::Breakpoint)).unwrap_err();
    assert!(matches!(err, PokeError::RegionNeedsStopMachine { .. }), "{err}");
    // One word NOP→MOV (not B, BL, NOP or BRK): refused, nothing written.
    let site = arena.site(0);
    let mov = 0xaa1e_03e9u32.to_le_bytes();
    let poke = textpoke::Poke::new(site, textpoke::arch::NOP, mov);
    let err = textpoke::Batch::from_iter([poke]).commit().unwrap_err();
    assert!(matches!(err, PokeError::NotSwappable { .. } | PokeError::NotEmulatable { .. }), "{err}");
    assert_eq!(enabled_sites(&arena), 0);
}

#[test]
fn stop_machine_rewrites_two_words_while_threads_call() {
    let arena = Arc::new(SiteArena::new(32, Layout::Region).unwrap());
    let opts = CommitOptions::strategy(Strategy::StopMachine);
    with_callers(&arena, || {
        for round in 0..10 {
            let stats = arena.batch(round % 2 == 0).commit_with(opts).unwrap();
            assert_eq!(stats.written, 32);
        }
    });
    assert_eq!(enabled_sites(&arena), 0);
    arena.batch(true).commit_with(opts).unwrap();
    assert_eq!(enabled_sites(&arena), 32);
}
