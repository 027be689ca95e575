//! Live patching: replacing functions of the running process with the
//! kernel's per-thread consistency model (issue 12), and reverting.

pub mod desc;
#[doc(hidden)]
pub mod macros;
pub mod notes;
pub mod object;
pub mod shadow;
pub use desc::{Callbacks, FuncDesc, PatchDesc, PostCallback, PreCallback};

// The transition engine (x86-64; the tracer's aarch64 port comes first).
#[cfg(target_arch = "x86_64")]
mod enter;
#[cfg(target_arch = "x86_64")]
mod nudge;
#[cfg(target_arch = "x86_64")]
mod outside;
#[cfg(target_arch = "x86_64")]
mod patcher;
#[cfg(target_arch = "x86_64")]
mod report;
#[cfg(target_arch = "x86_64")]
mod stack;
#[cfg(target_arch = "x86_64")]
mod state;
#[cfg(target_arch = "x86_64")]
pub use nudge::NudgeStats;
#[cfg(target_arch = "x86_64")]
pub use patcher::Patcher;
#[cfg(target_arch = "x86_64")]
pub use report::{
    Activity, Completed, Held, Holding, LiveError, PatchId, PatchInfo, PatchState, ThreadReport, TransitionReport,
};
