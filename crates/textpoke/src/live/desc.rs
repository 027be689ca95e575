//! What a live patch is, as the transition engine sees it.
//!
//! This is the contract between the two halves of `live`: the patch-object
//! reader (`object`: a patch `.so`'s `.note.textpoke` records, symbol
//! resolution, build-id checks) produces a [`PatchDesc`]; the transition
//! engine (`Patcher`) consumes it. A program that patches itself from code
//! it built in memory (a plugin hot-swapping a function) can also fill one
//! in directly.

use std::any::Any;
use std::ffi::c_int;

/// One patch: the functions it replaces, its callbacks, what keeps its
/// code loaded.
pub struct PatchDesc {
    /// Shown by `textpoke patch --list` and in reports (the patch file's
    /// name, or the name the patch gives itself).
    pub name: String,
    /// Atomic replace (the kernel's `klp_patch.replace`): on completion this
    /// patch replaces every earlier one; functions they patched and this one
    /// does not go back to their original code.
    pub replace: bool,
    /// The functions replaced; targets are distinct.
    pub funcs: Vec<FuncDesc>,
    /// The kernel's per-object pre/post (un)patch callbacks.
    pub callbacks: Callbacks,
    /// Owns whatever keeps the replacements' code mapped (a `dlopen`
    /// handle). Dropped after the patch is reverted and a grace period has
    /// passed, never for a forced patch (its code may still be running).
    pub keep_alive: Option<Box<dyn Any + Send + Sync>>,
}

/// One replaced function.
///
/// A function's code may be split: gcc moves the unlikely blocks of `foo`
/// into a separate local symbol `foo.cold` (or `foo.cold.N`) in
/// `.text.unlikely`, often far from `foo`, which `foo` jumps to and from
/// (clang's `-fsplit-machine-functions` does the same). A thread executing
/// there, or whose return address points there, is inside `foo`: the
/// stack checks look for every fragment. [`object::load`] finds the `.cold`
/// fragments of targets and replacements; a program filling this in
/// itself lists them in `target_fragments` and `replacement_fragments`
/// (empty for a function in one piece):
///
/// ```
/// # use textpoke::live::FuncDesc;
/// # let (target, size, cold, cold_size, replacement, rsize) = (0x1000, 32, 0x900, 46, 0x2000, 16);
/// let f = FuncDesc {
///     name: "parse".into(),
///     target,
///     target_size: size,
///     target_fragments: vec![(cold, cold_size)], // `parse.cold`
///     replacement,
///     replacement_size: rsize,
///     ..Default::default()
/// };
/// ```
///
/// [`object::load`]: super::object::load
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FuncDesc {
    /// The target's name as the program's symbol table spells it (reports).
    pub name: String,
    /// The target's entry address (its symbol's value in memory). The engine
    /// finds its entry site there and refuses a target without one.
    pub target: usize,
    /// The target's size in bytes (its symbol's `st_size`, at least 1): with
    /// `target`, the range a stack check looks for.
    pub target_size: usize,
    /// The replacement's entry address.
    pub replacement: usize,
    /// The replacement's size in bytes (at least 1), checked when reverting.
    pub replacement_size: usize,
    /// The target's other fragments, `(start, size)`: gcc's `name.cold`
    /// parts. Checked with `[target, target + target_size)`.
    pub target_fragments: Vec<(usize, usize)>,
    /// The replacement's other fragments, `(start, size)`, checked with
    /// `[replacement, replacement + replacement_size)`.
    pub replacement_fragments: Vec<(usize, usize)>,
}

/// A pre-patch / pre-unpatch callback: non-zero cancels the operation
/// (the kernel's `klp_pre_patch_callback` returning an error).
pub type PreCallback = unsafe extern "C" fn() -> c_int;
/// A post-patch / post-unpatch callback.
pub type PostCallback = unsafe extern "C" fn();

/// Callbacks, each optional, run on the thread that drives the transition.
#[derive(Clone, Copy, Default, Debug)]
pub struct Callbacks {
    /// Before any site is redirected; non-zero cancels the patch.
    pub pre_patch: Option<PreCallback>,
    /// After every thread switched to the new versions.
    pub post_patch: Option<PostCallback>,
    /// Before a revert starts; non-zero cancels the revert. If the revert
    /// then fails to start (nothing written, the patch stays enabled),
    /// `post_patch` runs again to redo what this undid.
    pub pre_unpatch: Option<PreCallback>,
    /// After every thread switched back.
    pub post_unpatch: Option<PostCallback>,
}
