//! The poke engine: batches of pokes validated as a whole and committed by
//! a strategy while every other thread keeps running.
//!
//! # Validation
//!
//! Before a single byte is written, every poke of the batch is checked
//! (DESIGN.md rule 8, the kernel's ftrace_bug): its bytes lie in executable
//! mappings of this process; the bytes there are exactly the expected ones;
//! expected and new bytes are each one whole instruction of the poke's
//! length (or, for a [`Poke::region`], whole instructions covering it; for
//! a [`Poke::first_byte`], whole instructions covering it on each side,
//! the two differing in their first byte only: see `validate`);
//! where a function symbol of the dynamic linker covers the address,
//! decoding from the function's start lands exactly on it (an instruction
//! boundary); pokes do not overlap. Any refusal is a [`PokeError`] and
//! nothing is written.
//!
//! The checks cost the same per poke whatever the batch's size: the pokes
//! are sorted once, `/proc/self/maps` is read once, each object's dynamic
//! symbols are read once for all the pokes in it (`dynsym`: `dladdr1`
//! walks an object's whole table per call), bytes are compared in place,
//! and nothing is allocated per poke (see `validate`).
//!
//! # Strategies
//!
//! - [`Strategy::Breakpoint`] (default): the kernel's text_poke_bp_batch,
//!   three sync rounds per batch whatever its size; see `breakpoint`.
//! - [`Strategy::StopMachine`]: park every other thread, check none is
//!   stopped strictly inside a poke, write, release; see `stop_machine`.
//!   A write that fails puts back the old bytes before the release.
//!
//! Commits from several threads are serialised by one lock. Committing from
//! a signal handler is not supported.
//!
//! # What an error leaves behind
//!
//! - **Refused: nothing written.** Every error of validation, and every
//!   error before the first byte is written: the SIGTRAP handler cannot be
//!   installed or was replaced ([`PokeError::TrapInstall`],
//!   [`PokeError::TrapHandlerReplaced`]), the pages cannot be made
//!   writable, threads cannot be parked ([`PokeError::ThreadUnresponsive`]
//!   while parking) or stay inside a region
//!   ([`PokeError::ThreadInsideRegion`]).
//! - **Failed mid-commit: put back.** A sync round that fails
//!   ([`PokeError::ThreadUnresponsive`], or [`PokeError::Sys`] from
//!   `membarrier` or from signalling the threads) or a write that fails
//!   ([`PokeError::WriteFailed`]) makes the commit put the old bytes back
//!   before it returns: the breakpoint strategy runs its protocol again
//!   towards them, stop-machine rewrites them while the threads are still
//!   parked. A `WriteFailed` says whether every write of that rollback
//!   succeeded; if one did not, some sites may still hold a trap byte or
//!   part of their new bytes, and nothing can say which (the static keys
//!   poison their keys). After the other errors the rollback writes pages
//!   that were just written with the same writer.
//! - **Written, protection not restored.** `PokeError::Sys` "restore code
//!   page protection (the batch was written)": the whole batch was written
//!   and synced, but a page kept the write permission it was given for the
//!   commit (the mprotect method).

#[cfg(target_arch = "x86_64")]
mod breakpoint;
// aarch64: the live strategy is a batch of atomic word swaps, one sync.
#[cfg(target_arch = "aarch64")]
#[path = "swap_aarch64.rs"]
mod breakpoint;
pub mod codemem;
mod dynsym;
mod stop_machine;
pub(crate) mod trap;
mod validate;
mod write;

pub use self::trap::{reinstall_trap_handler, traps_emulated};
pub(crate) use self::write::page_size;
pub use self::write::WriteMethod;
pub use crate::sync::SyncMethod;

use crate::error::{Location, PokeError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One replacement: at `addr`, the bytes `expected` become `new`.
///
/// A poke of one instruction keeps its bytes inline and its name shared
/// (an `Arc<str>`): a batch of many pokes allocates nothing per poke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poke {
    addr: usize,
    expected: Bytes,
    new: Bytes,
    name: Option<Arc<str>>,
    shape: Shape,
}

/// What a poke's bytes are, which decides how it may be committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// One whole instruction becomes another ([`Poke::new`]).
    One,
    /// Whole instructions become others ([`Poke::region`]).
    Region,
    /// Only the first byte changes; each side is whole instructions
    /// ([`Poke::first_byte`]).
    FirstByte,
}

impl Poke {
    /// Replaces one whole instruction at `addr`.
    pub fn new(addr: usize, expected: impl AsRef<[u8]>, new: impl AsRef<[u8]>) -> Poke {
        Poke {
            addr,
            expected: Bytes::from(expected.as_ref()),
            new: Bytes::from(new.as_ref()),
            name: None,
            shape: Shape::One,
        }
    }

    /// Replaces a region of several whole instructions (stop-machine only:
    /// a thread between two of them must not resume into the new bytes).
    pub fn region(addr: usize, expected: impl AsRef<[u8]>, new: impl AsRef<[u8]>) -> Poke {
        Poke { shape: Shape::Region, ..Poke::new(addr, expected, new) }
    }

    /// Changes the first byte only, turning whole instructions into one
    /// instruction of the same length, or one into several: gcc's pad of
    /// five one-byte NOPs (`90 90 90 90 90`) becomes `jmp rel32` (`e9 90 90
    /// 90 90`) and back. The bytes after the first are never written, so a
    /// thread between two of the old instructions runs on over the same
    /// bytes, and the breakpoint protocol may commit it while threads run
    /// (the rule and its proof are in the docs of `text::validate`).
    /// Validation refuses it unless each side is whole instructions
    /// covering the poke and only the first byte differs
    /// ([`PokeError::TailChanged`] otherwise).
    pub fn first_byte(addr: usize, expected: impl AsRef<[u8]>, new: impl AsRef<[u8]>) -> Poke {
        Poke { shape: Shape::FirstByte, ..Poke::new(addr, expected, new) }
    }

    /// Names the site in error messages (otherwise the symbol, if any).
    pub fn named(mut self, name: impl Into<Arc<str>>) -> Poke {
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
    /// Whether it replaces a region of several instructions.
    pub fn is_region(&self) -> bool {
        self.shape == Shape::Region
    }
    /// Whether it changes the first byte only ([`Poke::first_byte`]).
    pub fn is_first_byte(&self) -> bool {
        self.shape == Shape::FirstByte
    }

    /// The poke undoing this one.
    pub fn reversed(&self) -> Poke {
        Poke { expected: self.new.clone(), new: self.expected.clone(), ..self.clone() }
    }
}

/// The longest byte string kept inline (the longest instruction).
const INLINE_BYTES: usize = crate::arch::MAX_INSN_LEN;

/// A poke's bytes: inline when short (every single instruction), else on
/// the heap.
#[derive(Clone, PartialEq, Eq)]
enum Bytes {
    Inline { len: u8, buf: [u8; INLINE_BYTES] },
    Heap(Box<[u8]>),
}

impl From<&[u8]> for Bytes {
    fn from(b: &[u8]) -> Bytes {
        if b.len() <= INLINE_BYTES {
            let mut buf = [0; INLINE_BYTES];
            buf[..b.len()].copy_from_slice(b);
            Bytes::Inline { len: b.len() as u8, buf }
        } else {
            Bytes::Heap(b.into())
        }
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Inline { len, buf } => &buf[..*len as usize],
            Bytes::Heap(b) => b,
        }
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
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

    /// Validates and commits. On `Err`, nothing of the batch is left
    /// written, except as the module docs say ("What an error leaves
    /// behind"): when putting the old bytes back failed too (the
    /// `WriteFailed` message says so), or when only the restoring of the
    /// pages' protection failed after the batch was written.
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

/// A validated poke, ready to write: the batch's poke itself, borrowed.
#[derive(Debug)]
pub(crate) struct Planned<'a> {
    pub addr: usize,
    pub poke: &'a Poke,
    /// What the trap handler emulates (breakpoint strategy only).
    pub emu: Option<crate::arch::Emulation>,
}

impl Planned<'_> {
    /// The bytes there now.
    pub fn old(&self) -> &[u8] {
        self.poke.expected()
    }
    /// The bytes to write.
    pub fn new_bytes(&self) -> &[u8] {
        self.poke.new_bytes()
    }
    /// Where it is, for an error message. Asks the dynamic linker for the
    /// symbol (unless the poke is named): never call it while threads are
    /// parked, they may hold the linker's lock.
    #[cold]
    pub fn at(&self) -> Location {
        validate::locate(self.poke)
    }
}

/// A validated batch: pokes sorted by address, no-ops dropped, and the page
/// runs they touch.
#[derive(Debug)]
pub(crate) struct Plan<'a> {
    pub pokes: Vec<Planned<'a>>,
    pub runs: Vec<write::PageRun>,
}

/// Prepares the writer for a plan (the last step that can fail before a
/// byte is written) and notes its method.
fn prepare_writer(
    plan: &Plan<'_>,
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
    // The batch is written: only a page's protection is not what it was.
    restored.map_err(|source| PokeError::Sys { what: "restore code page protection (the batch was written)", source })
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
