//! Live patching: replacing functions of the running process with the
//! kernel's per-thread consistency model (issue 12), and reverting.

pub mod desc;
pub use desc::{Callbacks, FuncDesc, PatchDesc, PostCallback, PreCallback};
