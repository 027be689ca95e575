//! The breakpoint strategy: the user-space text_poke_bp_batch.

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
///     executes them: the first byte still traps;
///  6. write the first byte of every site; **sync**. The new instructions
///     are whole;
///  7. drop the descriptor once no handler holds it, restore protections.
///
/// Three sync rounds for any number of sites.
pub(crate) fn commit(
    plan: &Plan,
    sync: SyncMethod,
    write: Option<WriteMethod>,
    stats: &mut CommitStats,
) -> Result<(), PokeError> {
    trap::check_installed()?;
    let writer = Writer::prepare(plan.runs.clone(), write)
        .map_err(|source| PokeError::Sys { what: "make code pages writable", source })?;
    stats.write_method = Some(writer.method());

    let sites: Box<[TrapSite]> = plan
        .pokes
        .iter()
        .map(|p| TrapSite { addr: p.addr, emu: p.emu.expect("breakpoint pokes are emulatable") })
        .collect();
    trap::remember(plan.pokes.iter().map(|p| p.addr));
    trap::publish(sites); // Release: before any trap byte can be seen

    let result = run_protocol(&plan.pokes, &writer, sync, stats);

    trap::unpublish();
    let restored = writer.finish();
    result?;
    restored.map_err(|source| PokeError::Sys { what: "restore code page protection", source })
}

fn run_protocol(pokes: &[Planned], w: &Writer, sync: SyncMethod, stats: &mut CommitStats) -> Result<(), PokeError> {
    // Step 4: trap bytes.
    for p in pokes {
        write(w, p, p.addr, &[TRAP_BYTE])?;
    }
    sync_round(sync, stats)?;
    // Step 5: tails.
    for p in pokes.iter().filter(|p| p.new.len() > 1) {
        write(w, p, p.addr + 1, &p.new[1..])?;
    }
    sync_round(sync, stats)?;
    // Step 6: heads.
    for p in pokes {
        write(w, p, p.addr, &p.new[..1])?;
    }
    sync_round(sync, stats)
}

fn sync_round(sync: SyncMethod, stats: &mut CommitStats) -> Result<(), PokeError> {
    sync_cores(sync)?;
    stats.sync_rounds += 1;
    Ok(())
}

/// A write the prepared writer refuses cannot happen for a validated page
/// (mprotect'ed pages are plain stores; /proc/self/mem pages were probed).
/// Should it happen, say exactly where, and that sites may be half-done.
#[cold]
fn write(w: &Writer, p: &Planned, addr: usize, bytes: &[u8]) -> Result<(), PokeError> {
    w.write(addr, bytes).map_err(|source| PokeError::WriteFailed {
        at: p.at.clone(),
        len: bytes.len(),
        source,
        rollback: "; the batch stopped there (earlier sites of this step were written)".into(),
    })
}
