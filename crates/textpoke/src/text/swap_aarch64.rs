//! The live strategy on aarch64: a batch of atomic instruction swaps and
//! one sync (what [`Strategy::Breakpoint`](super::Strategy) commits there).
//!
//! No breakpoint dance is needed, nor possible: a partial write of a
//! 4-byte instruction would be a different instruction, and the Arm ARM
//! allows an instruction to be replaced while other cores execute it when
//! the old and the new one are both among B, BL, NOP and BRK (see
//! `arch/aarch64.rs`). So, as the kernel's `aarch64_insn_patch_text_nosync`
//! does per instruction, for the whole batch:
//!
//!  1. check that every poke is one aligned word whose old *and* new
//!     instruction may be swapped concurrently (validation checked the
//!     new one); refuse the batch otherwise — nothing written;
//!  2. make the pages writable (or open `/proc/self/mem`) — the last step
//!     that can fail before a word is written;
//!  3. write every word with one single-copy-atomic 32-bit store, and make
//!     it visible to instruction fetch (`DC CVAU`, `DSB ISH`, `IC IVAU`,
//!     `DSB ISH`: the writer does it after each write);
//!  4. **sync** once: a context synchronisation event on every core
//!     running a thread of the process (membarrier SYNC_CORE).
//!
//! A thread reaching a site before step 4 runs its old or its new
//! instruction, each whole. One sync round for any number of sites. A
//! failed write or sync puts the old words back the same way.

use super::write::{WriteMethod, Writer};
use super::{CommitStats, Plan, Planned};
use crate::arch;
use crate::error::PokeError;
use crate::sync::{sync_cores, SyncMethod};

/// Commits a validated plan while every other thread keeps running.
pub(crate) fn commit(
    plan: &Plan<'_>,
    sync: SyncMethod,
    write: Option<WriteMethod>,
    stats: &mut CommitStats,
) -> Result<(), PokeError> {
    // Step 1.
    for p in &plan.pokes {
        check_swappable(p)?;
    }
    // Step 2.
    let writer = super::prepare_writer(plan, write, stats)?;
    // Steps 3 and 4.
    let mut result = swap_all(&plan.pokes, &writer, sync, stats);
    if let Err(e) = &mut result {
        let restored = roll_back(&plan.pokes, &writer, sync);
        if let PokeError::WriteFailed { rollback, .. } = e {
            *rollback = if restored {
                "; the batch was rolled back to the old bytes".into()
            } else {
                "; rolling the batch back failed too: a site may hold its new instruction".into()
            };
        }
    }
    super::finish_writer(writer, result)
}

/// Both the old and the new word must be concurrently swappable.
fn check_swappable(p: &Planned<'_>) -> Result<(), PokeError> {
    let ok = p.addr % arch::INSN_LEN == 0
        && match (arch::word(p.old()), arch::word(p.new_bytes())) {
            (Some(old), Some(new)) => arch::concurrently_swappable(old, new),
            _ => false,
        };
    if ok {
        return Ok(());
    }
    // Name the word that is not swappable (the old one when both are fine
    // on their own but the old is, say, a MOV).
    let bad = if arch::emulation_for(p.addr, p.old()).is_none() { p.old() } else { p.new_bytes() };
    Err(PokeError::NotSwappable { at: p.at(), bytes: bad.to_vec() })
}

fn swap_all(pokes: &[Planned<'_>], w: &Writer, sync: SyncMethod, stats: &mut CommitStats) -> Result<(), PokeError> {
    for p in pokes {
        w.write(p.addr, p.new_bytes()).map_err(|source| PokeError::WriteFailed {
            at: p.at(),
            len: p.new_bytes().len(),
            source,
            rollback: String::new(), // filled in by `commit` after the rollback
        })?;
    }
    sync_cores(sync)?;
    stats.sync_rounds += 1;
    Ok(())
}

/// Puts the old words back after a failed step; whether every write
/// succeeded (the sync is best-effort).
#[cold]
fn roll_back(pokes: &[Planned<'_>], w: &Writer, sync: SyncMethod) -> bool {
    let mut all = true;
    for p in pokes {
        all &= w.write(p.addr, p.old()).is_ok();
    }
    crate::sync::sync_cores_briefly(sync);
    all
}
