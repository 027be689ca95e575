//! The function tracer: ftrace and function_graph for user space.
//!
//! # Pieces
//!
//! - **Sites** come from [`crate::sites`]: patchable entries and mcount
//!   NOPs of every loaded object, each with its function's name. Each gets
//!   an index into a lock-free site table (`hot.rs`) that trampolines read.
//! - **Ops** ([`TraceOp`]) are callbacks with a [`Filter`]; up to
//!   [`MAX_OPS`] at once. A site's ops are a bit mask.
//! - **Stubs**: a traced site calls (or for a graph trampoline jumps to)
//!   its own stub (`arch::tramp::call_stub`, `graph_stub`), made on first
//!   need in a stub block mapped within ±2 GiB of the site's object and
//!   never freed or given to another site while that object is loaded.
//!   A stub raises its thread's quiescence count (see `grace.rs`), then
//!   goes through its *word*, a data slot holding its trampoline's
//!   address, and lowers the count once the trampoline returned. A site
//!   has up to three stubs, one per kind: a call stub pushing its index
//!   (direct and list trampolines), one pushing its function's id (count
//!   trampolines), a graph stub.
//! - **Trampolines** live in blocks of executable memory shared by every
//!   site: the *direct* trampoline of a site's one op, or the *list*
//!   trampoline when the site has several. They save every caller-saved
//!   register and call the hot path. A block is retired once no stub's
//!   word points into it.
//! - **Inline code**: an op may bring code of its own for the tracer to
//!   run in its trampolines instead of calling it ([`InlineCode`]: the
//!   recorder does, `textpoke_record::RecordOp`; the tracer knows nothing
//!   of what the code does). A site whose only op has such code gets a
//!   trampoline that runs it, with the hot path as its fallback: the *count*
//!   trampoline, or at a function entry the *graph* trampoline. A graph
//!   site *jumps* to its stub, and the trampoline calls the function
//!   through a thunk in the graph return block
//!   (`arch::tramp::graph_trampoline`), so calls and returns pair up for
//!   the CPU's return predictor. `Tracer::set_inline_recording` (a test
//!   switch) turns both off.
//! - **function_graph**: ops that want exits get them through return
//!   address replacement and a per-thread shadow stack (`hot.rs`); the
//!   graph return block runs a graph op's inline exit code itself.
//!
//! # Changing what is traced
//!
//! Registering, re-filtering or unregistering an op recomputes each site's
//! mask, and only sites whose mask changes are touched:
//!
//! 1. the stubs and trampolines the new targets need are made, their code
//!    written together when the step ends (one `pwrite` per run, see
//!    `text::codemem::WriteSession`); if new trampoline code was written,
//!    cores are synced (a stub's word may lead a core there without any
//!    site changing); the words of stubs the sites do not call yet are
//!    pointed at their trampolines;
//! 2. the new masks are published (Release);
//! 3. one batch turns every site that changes stub kind into `call stub`,
//!    `jmp graph stub` or a NOP (a site that keeps its stub is not
//!    written): by the breakpoint protocol. A site still in gcc's
//!    five-one-byte-NOP form (a *pad*) getting its branch is a special
//!    case, decided by the [`PadMode`] ([`Tracer::set_pad_mode`]):
//!    - [`PadMode::OneByte`] and [`PadMode::OneByteOnly`]: only its first
//!      byte changes, `90` to `e9`, a jump to the site's *mirror slot*
//!      1.74 GiB below, which jumps on to its stub (`mirror.rs`); back to
//!      `90` when it goes off, the pad's exact bytes. A first-byte poke in
//!      the same breakpoint batch (`text::validate` proves it safe), with
//!      the pokes re-pointing slots whose site changes trampoline kind.
//!      Where no mirror can be placed, `OneByte` falls back to the next
//!      point and `OneByteOnly` leaves the pad untraced
//!      ([`Tracer::refused_pads`]);
//!    - [`PadMode::StopMachine`] (the default): the whole batch by the
//!      stop-machine strategy, which writes the branch over the five NOPs
//!      at once with every other thread parked and none of them between
//!      two of the NOPs (rule 1: the only way to make one instruction of
//!      several; see `text::stop_machine` for what that costs a thread in
//!      a system call). A pad written so is one instruction from then on,
//!      for the breakpoint protocol. One batch, not a stop-machine rewrite
//!      of the pads followed by a breakpoint batch: the threads are parked
//!      once and nothing is half done if it is refused. With
//!      [`Tracer::set_prepare_pads`] (the preloaded agent's choice), the
//!      threads being parked anyway, such a batch also turns every other
//!      pad of a live site into one 5-byte NOP, so that tracing it later
//!      takes the breakpoint protocol and signals nobody. A program's
//!      first registration (the agent's, from a constructor: usually no
//!      thread but textpoke's own) so prepares every pad of the objects
//!      loaded at start;
//! 4. the words of stubs the sites keep are pointed at their new
//!    trampolines, those of stubs no site calls any more at their null
//!    paths (the *unpublish*); blocks no word points into any more, stub
//!    blocks of unloaded objects and unregistered ops are retired, and
//!    freed after a grace period (`grace.rs`) by a background reclaimer
//!    thread: a grace period waits for every thread in tracer code to
//!    leave it, and nobody should wait for that (as the kernel frees
//!    ftrace trampolines from an RCU-tasks callback). [`Tracer::reclaim`]
//!    waits for it explicitly. Grace periods send no signal (where the
//!    kernel has `membarrier`): tracing changes never make a system call of
//!    the program fail with EINTR.
//!
//! If the batch is refused (a site's bytes changed under us), nothing is
//! written and the masks and words are put back.
//!
//! # Files
//!
//! | file | job |
//! |------|-----|
//! | `api.rs` | [`Tracer`]: registering, re-filtering and unregistering ops, listing functions |
//! | `state.rs` | the sites and ops the tracer knows, rescanning loaded objects, which inline code an op may use |
//! | `apply.rs` | steps 1 to 4 above, for every site whose ops change |
//! | `tramp_alloc.rs` | trampoline and stub blocks: allocation, code generation (`arch::tramp`), stub words |
//! | `mirror.rs` | gcc's pads enabled by their first byte: mirror slots, adapters, the pad mode |
//! | `reclaim.rs` | retiring what no word reaches, the background reclaimer (stopped by [`Tracer::stop_reclaimer`]), freeing after a grace period |
//! | `hot.rs` | what runs on every traced call: handlers, shadow stacks, the quiescence count |
//! | `grace.rs`, `registry.rs` | grace periods, and the registered threads whose counts they read |
//! | `plt.rs` | library calls: a site and a thunk per PLT slot, switched by a GOT store |
//! | `unwind.rs` | exceptions unwinding through replaced return addresses |
//! | `filter.rs` | which functions an op traces |
//! | `live.rs` | the hooks live patching (`crate::live`) uses: claiming function-entry sites, writing their jumps, the return trampoline |
//! | `testing.rs` | (`testing` builds) the trampolines around an op's inline code, for its tests |

mod api;
mod apply;
mod filter;
mod grace;
mod hot;
#[cfg(target_arch = "x86_64")]
pub(crate) mod live;
mod mirror;
mod plt;
mod reclaim;
mod registry;
mod state;
mod tramp_alloc;
mod unwind;

pub use api::Tracer;
pub use filter::{Filter, FilterError};
#[cfg(target_arch = "x86_64")]
pub(crate) use hot::{
    lp_guarded, lp_own_shadow, lp_push_marked, lp_read_shadow, lp_return_trampoline, lp_shadow_cell, LpShadowEntry,
};
pub use hot::{now, EmitFn, Entry, Exit, InlineCode, SitePlace, TraceOp, MAX_DEPTH, MAX_OPS};
pub use mirror::{PadMode, RefusedPad};

#[cfg(feature = "testing")]
mod testing;
#[cfg(feature = "testing")]
pub use hot::slow_calls_of_this_thread;
#[cfg(feature = "testing")]
pub use testing::{inline_fast_paths, FastPaths};

use crate::error::PokeError;
use std::sync::Arc;
use std::time::Duration;

/// Why a tracing change failed. Nothing was changed when it fails.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TraceError {
    #[error(transparent)]
    Poke(#[from] PokeError),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("at most {MAX_OPS} tracing ops may be registered at once")]
    TooManyOps,
    #[error("op {0} is not registered")]
    UnknownOp(usize),
    #[error("tracing cannot be changed from inside a tracing callback")]
    InCallback,
    #[error("cannot map trampoline memory within ±2 GiB of {near:#x}: {source}")]
    TrampolineMemory { near: usize, source: std::io::Error },
    #[error("cannot generate trampoline code: {0}")]
    CodeGen(String),
}

/// Waits up to `patience` until every other thread of the process has been
/// seen outside tracer code (stubs past their first instruction,
/// trampolines, callbacks) at least once since the call: the tracer's
/// grace period (`grace.rs`), usable on its own like synchronize_rcu. It
/// sends no signal where the kernel has `membarrier`. `Ok(false)` if some
/// thread was not seen so in time.
pub fn wait_for_grace(patience: Duration) -> Result<bool, TraceError> {
    if hot::in_tracer() != 0 {
        return Err(TraceError::InCallback);
    }
    Ok(grace::wait(patience)?)
}

/// A registered op.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct OpHandle(usize);

impl OpHandle {
    pub fn id(&self) -> usize {
        self.0
    }
}

/// A traceable function, as listed by [`Tracer::functions`].
#[derive(Debug, Clone)]
pub struct FunctionInfo {
    pub site: u32,
    pub function: Arc<str>,
    /// The patched NOP.
    pub addr: usize,
    pub place: SitePlace,
    /// Bit mask of the ops tracing it now.
    pub ops: u64,
    /// How its ops are called now.
    pub trampoline: TrampolineKind,
}

/// How a site's ops are called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrampolineKind {
    /// Not traced: the site is a NOP.
    None,
    /// One op, called through the hot path.
    Direct,
    /// Several ops, called through the hot path.
    List,
    /// A count-only op alone, counted inline.
    Count,
    /// A graph-recording op alone at a function entry, recorded inline.
    Graph,
}
