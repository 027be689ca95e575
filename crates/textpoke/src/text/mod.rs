//! The poke engine: batches of pokes validated as a whole and committed by
//! a strategy while every other thread keeps running.
//!
//! # Validation
//!
//! Before a single byte is written, every poke of the batch is checked
//! (DESIGN.md rule 8, the kernel's ftrace_bug): its bytes lie in executable
//! mappings of this process; the bytes there are exactly the expected ones;
//! expected and new bytes are each one whole instruction of the poke's
//! length (or, for a [`Poke::region`], whole instructions covering it);
//! where a function symbol covers the address, decoding from the function's
//! start lands exactly on it (an instruction boundary); pokes do not
//! overlap. Any refusal is a [`PokeError`] and nothing is written.
//!
//! # Strategies
//!
//! - [`Strategy::Breakpoint`] (default): the kernel's text_poke_bp_batch,
//!   three sync rounds per batch whatever its size; see [`breakpoint`].
//! - [`Strategy::StopMachine`]: park every other thread, check none is
//!   stopped strictly inside a poke, write, release; see [`stop_machine`].
//!
//! Commits from several threads are serialised by one lock. Committing from
//! a signal handler is not supported.

mod breakpoint;
pub mod codemem;
mod stop_machine;
pub(crate) mod trap;
mod validate;
mod write;

pub use self::trap::{reinstall_trap_handler, traps_emulated};
pub use self::write::page_size;
pub use self::write::WriteMethod;
pub use crate::sync::SyncMethod;

use crate::error::{Location, PokeError};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One replacement: at `addr`, the bytes `expected` become `new`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poke {
    addr: usize,
    expected: Vec<u8>,
    new: Vec<u8>,
    name: Option<String>,
    region: bool,
}

impl Poke {
    /// Replaces one whole instruction at `addr`.
    pub fn new(addr: usize, expected: impl Into<Vec<u8>>, new: impl Into<Vec<u8>>) -> Poke {
        Poke { addr, expected: expected.into(), new: new.into(), name: None, region: false }
    }

    /// Replaces a region of several whole instructions (stop-machine only:
    /// a thread between two of them must not resume into the new bytes).
    pub fn region(addr: usize, expected: impl Into<Vec<u8>>, new: impl Into<Vec<u8>>) -> Poke {
        Poke { region: true, ..Poke::new(addr, expected, new) }
    }

    /// Names the site in error messages (otherwise the symbol, if any).
    pub fn named(mut self, name: impl Into<String>) -> Poke {
        self.name = Some(name.into());
        self
    }

    pub fn addr(&self) -> usize {
        self.addr
    }
    pub fn expected(&self) -> &[u8] {
        &self.expected
    }
    pub fn new_bytes(&self) -> &[u8] {
        &self.new
    }
    pub fn len(&self) -> usize {
        self.expected.len()
    }
    pub fn is_empty(&self) -> bool {
        self.expected.is_empty()
    }

    /// The poke undoing this one.
    pub fn reversed(&self) -> Poke {
        Poke { expected: self.new.clone(), new: self.expected.clone(), ..self.clone() }
    }
}

/// How a batch is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Trap byte, sync, tails, sync, heads, sync (DESIGN.md rule 2).
    #[default]
    Breakpoint,
    /// Park all other threads, write, release.
    StopMachine,
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::Breakpoint => "breakpoint",
            Strategy::StopMachine => "stop-machine",
        })
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Strategy, String> {
        match s {
            "breakpoint" | "bp" => Ok(Strategy::Breakpoint),
            "stop-machine" | "stop_machine" | "stop" => Ok(Strategy::StopMachine),
            _ => Err(format!("unknown strategy {s:?}: expected breakpoint or stop-machine")),
        }
    }
}

/// Options of a commit; the default picks the best of everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitOptions {
    pub strategy: Strategy,
    /// `None`: membarrier SYNC_CORE where the kernel offers it.
    pub sync: Option<SyncMethod>,
    /// `None`: mprotect unless the process refuses W+X pages.
    pub write: Option<WriteMethod>,
}

impl CommitOptions {
    pub fn strategy(strategy: Strategy) -> CommitOptions {
        CommitOptions { strategy, ..CommitOptions::default() }
    }
}

/// What a commit did.
#[derive(Debug, Clone)]
pub struct CommitStats {
    pub strategy: Strategy,
    pub sync_method: SyncMethod,
    pub write_method: Option<WriteMethod>,
    /// Pokes written (pokes whose new bytes equal the old are skipped).
    pub written: usize,
    /// Sync-core rounds (3 for a breakpoint batch, 1 for stop-machine).
    pub sync_rounds: u32,
    /// Traps the handler emulated during this commit.
    pub traps: u64,
    /// Stop-machine: how many times threads were parked.
    pub park_attempts: u32,
    pub elapsed: Duration,
}

/// A set of pokes committed together.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pokes: Vec<Poke>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }
    pub fn with_capacity(n: usize) -> Batch {
        Batch { pokes: Vec::with_capacity(n) }
    }
    pub fn push(&mut self, poke: Poke) -> &mut Batch {
        self.pokes.push(poke);
        self
    }
    pub fn len(&self) -> usize {
        self.pokes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.pokes.is_empty()
    }
    pub fn pokes(&self) -> &[Poke] {
        &self.pokes
    }

    /// Validates and commits with the default options (breakpoint strategy).
    pub fn commit(&self) -> Result<CommitStats, PokeError> {
        self.commit_with(CommitOptions::default())
    }

    /// Validates and commits. On `Err`, nothing of the batch was written.
    pub fn commit_with(&self, opts: CommitOptions) -> Result<CommitStats, PokeError> {
        let _lock = commit_lock();
        let start = Instant::now();
        let traps_before = trap::traps_emulated();
        let sync = opts.sync.unwrap_or_else(crate::sync::best_method);
        let mut stats = CommitStats {
            strategy: opts.strategy,
            sync_method: sync,
            write_method: None,
            written: 0,
            sync_rounds: 0,
            traps: 0,
            park_attempts: 0,
            elapsed: Duration::ZERO,
        };
        let plan = validate::validate(&self.pokes, opts.strategy)?;
        if !plan.pokes.is_empty() {
            match opts.strategy {
                Strategy::Breakpoint => breakpoint::commit(&plan, sync, opts.write, &mut stats)?,
                Strategy::StopMachine => stop_machine::commit(&plan, sync, opts.write, &mut stats)?,
            }
        }
        stats.written = plan.pokes.len();
        stats.traps = trap::traps_emulated() - traps_before;
        stats.elapsed = start.elapsed();
        Ok(stats)
    }
}

impl FromIterator<Poke> for Batch {
    fn from_iter<I: IntoIterator<Item = Poke>>(iter: I) -> Batch {
        Batch { pokes: iter.into_iter().collect() }
    }
}

impl Extend<Poke> for Batch {
    fn extend<I: IntoIterator<Item = Poke>>(&mut self, iter: I) {
        self.pokes.extend(iter)
    }
}

/// A validated poke, ready to write.
#[derive(Debug)]
pub(crate) struct Planned {
    pub addr: usize,
    pub old: Vec<u8>,
    pub new: Vec<u8>,
    pub at: Location,
    /// What the trap handler emulates (breakpoint strategy only).
    pub emu: Option<crate::arch::Emulation>,
}

/// A validated batch: pokes sorted by address, no-ops dropped, and the page
/// runs they touch.
#[derive(Debug)]
pub(crate) struct Plan {
    pub pokes: Vec<Planned>,
    pub runs: Vec<write::PageRun>,
}

/// Prepares the writer for a plan (the last step that can fail before a
/// byte is written) and notes its method.
fn prepare_writer(
    plan: &Plan,
    write: Option<WriteMethod>,
    stats: &mut CommitStats,
) -> Result<write::Writer, PokeError> {
    let w = write::Writer::prepare(plan.runs.clone(), write)
        .map_err(|source| PokeError::Sys { what: "make code pages writable", source })?;
    stats.write_method = Some(w.method());
    Ok(w)
}

/// Restores page protection after a strategy ran; the strategy's error
/// comes first.
fn finish_writer(w: write::Writer, result: Result<(), PokeError>) -> Result<(), PokeError> {
    let restored = w.finish();
    result?;
    restored.map_err(|source| PokeError::Sys { what: "restore code page protection", source })
}

static COMMIT_LOCK: Mutex<()> = Mutex::new(());

/// Serialises commits (and trap-handler installation) process-wide.
pub(crate) fn commit_lock() -> MutexGuard<'static, ()> {
    COMMIT_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// What this kernel and process offer the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `membarrier(PRIVATE_EXPEDITED_SYNC_CORE)` registered and usable.
    pub membarrier_sync_core: bool,
    /// The process refuses W+X pages (`PR_MDWE_REFUSE_EXEC_GAIN`).
    pub mdwe_refuse_exec_gain: bool,
    pub sync_method: SyncMethod,
    pub write_method: WriteMethod,
}

/// Probes the kernel and the process.
pub fn capabilities() -> Capabilities {
    let sync_method = crate::sync::best_method();
    let mdwe = crate::sys::mdwe_refuses_exec_gain();
    Capabilities {
        membarrier_sync_core: sync_method == SyncMethod::Membarrier,
        mdwe_refuse_exec_gain: mdwe,
        sync_method,
        write_method: if mdwe { WriteMethod::ProcMem } else { WriteMethod::Mprotect },
    }
}
