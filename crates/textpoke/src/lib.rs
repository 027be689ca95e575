//! textpoke: the Linux kernel's live code patching for multithreaded
//! user-space processes.
//!
//! The layers, from the bottom up; each uses only those before it in
//! this list (DESIGN.md's picture; `ARCHITECTURE.md` at the repository's
//! root is the map, with where to start reading for each):
//!
//! 1. [`arch`]: the only module that knows instruction encodings —
//!    encodings, decoding checks, trap emulation, an assembler
//!    ([`arch::asm`]) and the trampoline frames; it uses no feature;
//! 2. `sys`: thin wrappers over the kernel facilities, the one place
//!    for raw system calls — the crate `textpoke-sys`, which the crates
//!    above use too;
//! 3. [`sync`]: the threads of this process — sync-core (membarrier or
//!    signals), parking them, the fork lock;
//! 4. [`text`]: the poke engine — batches of pokes validated as a whole
//!    and committed by the breakpoint or the stop-machine strategy;
//! 5. [`sites`]: where the patchable places are — patchable entries,
//!    `__mcount_loc` sites and the entry and exit sites of Rust functions
//!    marked with [`#[traced]`](traced), in every loaded object, mapped to
//!    functions;
//! 6. [`funcs`] and [`clock`]: the dense ids of traced functions, and the
//!    timestamp clock — for the tracer and the ops above it;
//! 7. [`keys`]: static keys (jump labels) — branch sites compiled in as a
//!    NOP or a JMP and flipped, all sites of a key in one batch;
//! 8. [`trace`]: the function tracer — ops ([`TraceOp`]) called at
//!    traced sites through stubs and trampolines, the function graph,
//!    grace periods before anything is freed.
//! 9. [`live`]: live patching — functions replaced with the kernel's
//!    per-thread consistency model ([`live::Patcher`], [`live::PatchDesc`],
//!    [`live::LiveError`], the transition reports), on the tracer's entry
//!    sites.
//!
//! Beside them, [`stress`] runs the poke engine against threads and
//! signal handlers calling the sites it flips (`textpoke selftest`).
//! The main types are re-exported here: [`Batch`], [`Poke`],
//! [`PokeError`], the key types, the site types, [`Tracer`],
//! [`TraceError`]. Test switches exist only with the `testing` feature.
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

// On aarch64 some engine items are used by x86-64-only parts (live
// patching, `#[traced]` sites, the one-byte pad mode): they stay, unused
// there for now.
#![cfg_attr(target_arch = "aarch64", allow(dead_code))]

pub mod arch;
pub mod clock;
mod error;
pub mod funcs;
pub mod keys;
// Live patching redirects entry sites the tracer owns: x86-64 only for now.
#[cfg(target_arch = "x86_64")]
pub mod live;
pub mod sites;
pub mod stress;
pub mod sync;
/// The bottom layer, a crate of its own (see the list above).
pub(crate) use textpoke_sys as sys;
pub mod text;
// The tracer: stubs and trampolines generated for x86-64 and aarch64
// (arch::tramp, arch::asm; on aarch64 without the inline fast paths,
// library-call thunks and `#[traced]` sites: arch/tramp_aarch64.rs).
pub mod trace;

pub use error::{Location, PokeError};
pub use keys::{KeyError, StaticKey, StaticKeyFalse, StaticKeyTrue, Update};
pub use sites::{Site, SiteKind, SiteTable, SitesError};
pub use sync::SyncMethod;
pub use text::{capabilities, Batch, Capabilities, CommitOptions, CommitStats, Poke, Strategy, WriteMethod};
pub use trace::{Entry, Exit, Filter, OpHandle, TraceError, TraceOp, Tracer};

/// Marks a function, or every method of an `impl` block, for the function
/// tracer: an entry site at the start of its body and an exit site run by a
/// drop guard (also when a panic unwinds), each a 5-byte NOP (aarch64: one
/// `nop`) recorded in the `textpoke_sites` section. See [`sites::marked`]
/// for the record format and the crate `textpoke-macros` for the options.
pub use textpoke_macros::traced;
