//! Live patching: replacing functions of the running process with the
//! kernel's per-thread consistency model (issue 12), and reverting.

pub mod desc;
#[doc(hidden)]
pub mod macros;
pub mod notes;
pub mod object;
pub mod shadow;
pub use desc::{Callbacks, FuncDesc, PatchDesc, PostCallback, PreCallback};
