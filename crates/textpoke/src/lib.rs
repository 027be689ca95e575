//! textpoke: the Linux kernel's live code patching for multithreaded
//! user-space processes.
//!
//! Layers, each using only those below it (see DESIGN.md):
//!
//! - [`text`]: the poke engine — batches of pokes validated as a whole and
//!   committed by the breakpoint or the stop-machine strategy;
//! - [`keys`]: static keys (jump labels) — branch sites compiled in as a
//!   NOP or a JMP and flipped, all sites of a key in one batch;
//! - [`sites`]: where the patchable places are — patchable entries,
//!   `__mcount_loc` sites and the entry and exit sites of Rust functions
//!   marked with [`#[traced]`](traced), in every loaded object, mapped to
//!   functions;
//! - [`sync`]: the threads of this process — sync-core (membarrier or
//!   signals), parking;
//! - [`sys`]: thin wrappers over the kernel facilities;
//! - [`arch`]: instruction encodings, decoding checks, trap emulation.
//!
//! This crate is the engine: it depends on nothing a front end needs.
//! Above it, each in its own crate: the recorder, the trace format and its
//! reader, and glob filters for the tracer (`textpoke-record`); the
//! analyses (`textpoke-analysis`); the control protocol
//! (`textpoke-control`); the front ends (`textpoke-cli`, `textpoke-agent`,
//! and the C API `textpoke-c`, which needs only static keys).
//!
//! ```no_run
//! use textpoke::{Batch, Poke};
//! # let site = 0usize; let target = 0usize;
//! let call = textpoke::arch::encode_call(site, target).unwrap();
//! let mut batch = Batch::new();
//! batch.push(Poke::new(site, textpoke::arch::NOP5, call));
//! batch.commit()?; // nothing is written if any poke is refused
//! # Ok::<(), textpoke::PokeError>(())
//! ```

pub mod arch;
pub mod clock;
mod error;
pub mod funcs;
pub mod keys;
pub mod sites;
pub mod stress;
pub mod sync;
pub mod sys;
pub mod text;
pub mod trace;

pub use error::{Location, PokeError};
pub use keys::{KeyError, StaticKey, StaticKeyFalse, StaticKeyTrue, Update};
pub use sites::{Site, SiteKind, SiteTable, SitesError};
pub use sync::SyncMethod;
pub use text::{capabilities, Batch, Capabilities, CommitOptions, CommitStats, Poke, Strategy, WriteMethod};
pub use trace::{Entry, Exit, Filter, OpHandle, TraceError, TraceOp, Tracer};

/// Marks a function, or every method of an `impl` block, for the function
/// tracer: an entry site at the start of its body and an exit site run by a
/// drop guard (also when a panic unwinds), each a 5-byte NOP recorded in the
/// `textpoke_sites` section. See [`sites::marked`] for the record format and
/// the crate `textpoke-macros` for the options.
pub use textpoke_macros::traced;
