//! The breakpoint strategy: the user-space text_poke_bp_batch (seed 004;
//! DESIGN.md rule 2).
//!
//! A site's instruction changes while other threads may be running it. The
//! first byte of every site becomes a trap byte first, so that from then on
//! a thread reaching a site traps instead of running a mix of old and new
//! bytes, and the SIGTRAP handler ([`trap`]) stands in for the *new*
//! instruction (CALL: push and jump; JMP: jump; NOP: skip). Then the tails
//! are written, then the heads, replacing the trap bytes: each step
//! followed by a sync of every core, so three syncs for the whole batch
//! however many sites it has. The steps are numbered on [`commit`], which
//! runs them; a failure runs them again towards the old bytes (see
//! "What an error leaves behind" in the parent module).

use super::trap::{self, TrapSite};
use super::write::{WriteMethod, Writer};
use super::{CommitStats, Plan, Planned};
use crate::arch::TRAP_BYTE;
use crate::error::PokeError;
use crate::sync::{sync_cores, SyncMethod};

/// Commits a validated plan while every other thread keeps running.
///
/// The protocol (seed 004; DESIGN.md rule 2), for all sites at once:
///
///  1. install our SIGTRAP handler, or check it is still installed;
///  2. make the pages writable (or open /proc/self/mem) — the last step
///     that can fail before a byte is written;
///  3. remember every site address (for late traps), then publish the
///     in-flight descriptor: each site with the emulation of its *new*
///     instruction;
///  4. write the trap byte over the first byte of every site; **sync**.
///     From here a thread reaching a site traps and is emulated; none can
///     run a mix of old and new bytes;
///  5. write all but the first byte of every site; **sync**. No thread
///     executes them: the first byte still traps. A tail equal to the old
///     one is not written (a [`Poke::first_byte`](super::Poke::first_byte)'s
///     never is: threads between its old instructions run those bytes);
///  6. write the first byte of every site; **sync**. The new instructions
///     are whole;
///  7. drop the descriptor once no handler holds it, restore protections.
///
/// Three sync rounds for any number of sites. If a step fails (a thread
/// does not answer the signal sync, a write is refused), the batch is
/// rolled back by the same protocol towards the old bytes, with the
/// descriptor emulating the old instructions: trap bytes on every site,
/// old tails, old heads, each followed by a best-effort sync. A
/// [`PokeError::WriteFailed`] says whether every write of the rollback
/// succeeded (then every site holds its old bytes) or not (then a site may
/// hold a trap byte or part of its new bytes).
pub(crate) fn commit(
    plan: &Plan<'_>,
    sync: SyncMethod,
    write: Option<WriteMethod>,
    stats: &mut CommitStats,
) -> Result<(), PokeError> {
    trap::check_installed()?;
    let writer = super::prepare_writer(plan, write, stats)?;

    let sites: Box<[TrapSite]> = plan
        .pokes
        .iter()
        .map(|p| TrapSite { addr: p.addr, emu: p.emu.expect("breakpoint pokes are emulatable") })
        .collect();
    trap::remember(plan.pokes.iter().map(|p| p.addr));
    trap::publish(sites); // Release: before any trap byte can be seen

    let mut result = run_protocol(&plan.pokes, &writer, sync, stats);
    if let Err(e) = &mut result {
        let restored = roll_back(&plan.pokes, &writer, sync);
        if let PokeError::WriteFailed { rollback, .. } = e {
            *rollback = if restored {
                "; the batch was rolled back to the old bytes".into()
            } else {
                "; rolling the batch back failed too: a site may hold a trap byte or part of its new bytes".into()
            };
        }
    }

    trap::unpublish();
    super::finish_writer(writer, result)
}

fn run_protocol(pokes: &[Planned<'_>], w: &Writer, sync: SyncMethod, stats: &mut CommitStats) -> Result<(), PokeError> {
    // Step 4: trap bytes.
    for p in pokes {
        write(w, p, p.addr, &[TRAP_BYTE])?;
    }
    sync_round(sync, stats)?;
    // Step 5: tails (those that change).
    for p in pokes.iter().filter(|p| p.new_bytes().len() > 1 && p.new_bytes()[1..] != p.old()[1..]) {
        write(w, p, p.addr + 1, &p.new_bytes()[1..])?;
    }
    sync_round(sync, stats)?;
    // Step 6: heads.
    for p in pokes {
        write(w, p, p.addr, &p.new_bytes()[..1])?;
    }
    sync_round(sync, stats)
}

/// Puts the old bytes back after a failed step (see [`commit`]). Whether
/// every write succeeded (the syncs are best-effort: parked or signalled
/// threads serialise anyway before they run the code again).
#[cold]
fn roll_back(pokes: &[Planned<'_>], w: &Writer, sync: SyncMethod) -> bool {
    // Emulate the old instruction where it can be; otherwise keep the new
    // one's emulation (a thread trapping now runs the new instruction once,
    // as it could have had the commit succeeded).
    let sites: Box<[TrapSite]> = pokes
        .iter()
        .map(|p| TrapSite {
            addr: p.addr,
            emu: super::validate::emulation(p.poke, p.old()).unwrap_or(p.emu.expect("emulatable")),
        })
        .collect();
    trap::unpublish();
    trap::publish(sites);
    // Every write is tried even after one failed: each site gets as close
    // to its old bytes as it can.
    let mut all = true;
    for p in pokes {
        all &= w.write(p.addr, &[TRAP_BYTE]).is_ok();
    }
    crate::sync::sync_cores_briefly(sync);
    for p in pokes.iter().filter(|p| p.old().len() > 1 && p.new_bytes()[1..] != p.old()[1..]) {
        all &= w.write(p.addr + 1, &p.old()[1..]).is_ok();
    }
    crate::sync::sync_cores_briefly(sync);
    for p in pokes {
        all &= w.write(p.addr, &p.old()[..1]).is_ok();
    }
    crate::sync::sync_cores_briefly(sync);
    all
}

fn sync_round(sync: SyncMethod, stats: &mut CommitStats) -> Result<(), PokeError> {
    sync_cores(sync)?;
    stats.sync_rounds += 1;
    Ok(())
}

/// A write the prepared writer refuses cannot happen for a validated page
/// (mprotect'ed pages are plain stores; /proc/self/mem pages were probed).
/// Should it happen, say exactly where; [`commit`] says what the rollback
/// achieved.
#[cold]
fn write(w: &Writer, p: &Planned<'_>, addr: usize, bytes: &[u8]) -> Result<(), PokeError> {
    w.write(addr, bytes).map_err(|source| PokeError::WriteFailed {
        at: p.at(),
        len: bytes.len(),
        source,
        rollback: String::new(), // filled in by `commit` after the rollback
    })
}
