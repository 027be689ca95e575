//! What the [`Patcher`](super::Patcher) tells: patch ids and states,
//! transition reports (the kernel's "is sleeping on function ..."), and
//! its errors.

use std::fmt;
use std::time::Duration;

/// A patch, as numbered by the patcher (from 1, never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PatchId(pub u64);

impl fmt::Display for PatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where a patch is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchState {
    /// In its patching transition: threads switch to its versions.
    Patching,
    /// Every thread runs its versions.
    Enabled,
    /// In its unpatching transition (a revert, or a reversed patching).
    Unpatching,
}

/// A patch, as [`Patcher::patches`](super::Patcher::patches) lists it.
#[derive(Debug, Clone)]
pub struct PatchInfo {
    /// Its id.
    pub id: PatchId,
    /// [`PatchDesc::name`](super::PatchDesc::name).
    pub name: String,
    /// Where it is in its life.
    pub state: PatchState,
    /// The functions it replaces (target names).
    pub functions: Vec<String>,
    /// Its transition was completed by force: its code is never unloaded.
    pub forced: bool,
    /// An atomic-replace patch.
    pub replace: bool,
}

/// Which version of a function a thread holds a frame of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// A version below the patch (the original, or an earlier patch's).
    Old,
    /// The patch's version.
    New,
}

/// What a pending thread holds, as its last check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// The function's name; `"(a live-patch stub)"` for a thread caught in
    /// a stub or the slow path, `"(a frame entered during the transition)"`
    /// for a frame counted on its shadow stack.
    pub function: String,
    /// Which version of it.
    pub version: Held,
    /// Frames from the top of its stack (for a scan: stack words).
    pub frame: u32,
}

/// What a pending thread is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Activity {
    /// Running or runnable: it switches itself at its next patched call or
    /// traced entry.
    Running,
    /// Blocked in the kernel: in system call `syscall` (its name when
    /// known, else its number; `None`: blocked outside a system call, e.g.
    /// a page fault), seen so since `for_` ago.
    Blocked {
        /// The system call's name or number.
        syscall: Option<String>,
        /// Since when it was seen blocked so.
        for_: Duration,
    },
}

/// One thread that has not switched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadReport {
    /// Its thread id.
    pub tid: i32,
    /// Its name (`/proc/self/task/TID/comm`).
    pub comm: String,
    /// Running or blocked.
    pub activity: Activity,
    /// What it holds, if a check found it.
    pub holds: Option<Holding>,
    /// Its last unwind was not reliable (the scan decided).
    pub unreliable: bool,
}

impl fmt::Display for ThreadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tid {} ({})", self.tid, self.comm)?;
        match &self.holds {
            Some(h) => {
                // A pseudo-name in parentheses is no function: no "()".
                let call = if h.function.starts_with('(') { "" } else { "()" };
                let version = if h.version == Held::Old { "old" } else { "new" };
                write!(f, ": holds {}{call} [{version}] (frame {})", h.function, h.frame)?
            }
            None => f.write_str(": holds no patched function that a check saw")?,
        }
        match &self.activity {
            Activity::Running => f.write_str(", running")?,
            Activity::Blocked { syscall: Some(s), for_ } => {
                write!(f, ", blocked in {s}(2) for {:.1} s", for_.as_secs_f64())?
            }
            Activity::Blocked { syscall: None, for_ } => write!(f, ", blocked for {:.1} s", for_.as_secs_f64())?,
        }
        if self.unreliable {
            f.write_str(" (its stack could not be unwound reliably)")?;
        }
        Ok(())
    }
}

/// A transition in progress.
#[derive(Debug, Clone)]
pub struct TransitionReport {
    /// The patch in transition.
    pub patch: PatchId,
    /// Its name.
    pub name: String,
    /// [`PatchState::Patching`] or [`PatchState::Unpatching`].
    pub direction: PatchState,
    /// How many times it was reversed.
    pub reversals: u32,
    /// Since it started.
    pub elapsed: Duration,
    /// The threads that have not switched.
    pub pending: Vec<ThreadReport>,
}

impl fmt::Display for TransitionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = if self.direction == PatchState::Patching { "patching" } else { "unpatching" };
        write!(
            f,
            "{dir} patch {} ({}) pending for {:.1} s, {} thread(s) not switched",
            self.patch,
            self.name,
            self.elapsed.as_secs_f64(),
            self.pending.len()
        )?;
        for t in &self.pending {
            write!(f, "\n  {t}")?;
        }
        Ok(())
    }
}

/// A completed transition.
#[derive(Debug, Clone)]
pub struct Completed {
    /// The patch whose transition completed.
    pub patch: PatchId,
    /// [`PatchState::Enabled`] (patched) or [`PatchState::Unpatching`]
    /// (reverted: the patch is gone from the list).
    pub state: PatchState,
    /// From its start to its completion.
    pub took: Duration,
    /// Completed by [`Patcher::force`](super::Patcher::force).
    pub forced: bool,
}

/// Why a live-patching call failed. A refused `apply` or `revert` has
/// written nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LiveError {
    #[error("patch {id} ({name}) is in transition: wait for it to complete (Patcher::wait), revert it (reverses it), or force it, then try again")]
    /// One transition at a time (the kernel's `-EBUSY`).
    Busy { id: PatchId, name: String },
    #[error("patch {name:?} replaces no function")]
    /// A patch with no function.
    Empty { name: String },
    #[error("patch {name:?}: {what}")]
    /// A malformed description (a target twice, a zero size...).
    BadDesc { name: String, what: String },
    #[error("{function}() at {addr:#x} has no function-entry site: build it with -fpatchable-function-entry=5 (or -pg -mfentry -mnop-mcount -mrecord-mcount) so that it can be patched")]
    /// A target without a function-entry site.
    NoEntrySite { function: String, addr: usize },
    #[error("patch {name:?}: its {callback} callback returned {code}: nothing was changed")]
    /// A pre-patch or pre-unpatch callback refused.
    Callback { name: String, callback: &'static str, code: i32 },
    #[error("no patch {0}: see Patcher::patches for the applied ones")]
    /// No such applied patch.
    UnknownPatch(PatchId),
    #[error("no patch is applied")]
    /// Nothing to revert.
    NoPatches,
    #[error("patch {on_top} ({on_top_name}) is stacked on patch {patch} ({patch_name}) for {function}(): revert {on_top} first")]
    /// A revert of a patch another is stacked on.
    Stacked { patch: PatchId, patch_name: String, on_top: PatchId, on_top_name: String, function: String },
    #[error("no transition is in progress")]
    /// `wait` or `force` with no transition.
    NoTransition,
    #[error("{0}\nthe transition stays pending: wait again, revert (reverses it), or force it (its code is then never unloaded)")]
    /// `wait` timed out: the transition stays pending.
    Pending(TransitionReport),
    #[error("at most {0} functions can be live-patched in one process")]
    /// The live-site table is full.
    TooManySites(usize),
    #[error("cannot make live-patch stubs near {near:#x}: {source}")]
    /// Stub memory could not be mapped or written.
    Memory { near: usize, source: std::io::Error },
    #[error("live patching cannot be changed from a signal handler or a tracing callback")]
    /// Called from a signal handler inside live-patching code or a tracing callback.
    InCallback,
    #[error(transparent)]
    /// The tracer refused a site change (nothing was written).
    Trace(#[from] crate::trace::TraceError),
    /// Completing a transition failed writing the sites' direct jumps;
    /// nothing changed: the transition is still pending (every thread at
    /// its target), and the next [`super::Patcher::wait`] or force tries
    /// again.
    #[error("completing patch {patch}: writing the sites' direct jumps failed: {source}; nothing changed: the transition stays pending (every thread is at its target, calls go through the stubs), and Patcher::wait or force completes it again")]
    Completing { patch: PatchId, source: crate::trace::TraceError },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holding(function: &str) -> ThreadReport {
        ThreadReport {
            tid: 7,
            comm: "w".into(),
            activity: Activity::Running,
            holds: Some(Holding { function: function.into(), version: Held::Old, frame: 2 }),
            unreliable: false,
        }
    }

    #[test]
    fn functions_get_parentheses_and_pseudo_names_do_not() {
        assert_eq!(holding("outer").to_string(), "tid 7 (w): holds outer() [old] (frame 2), running");
        assert_eq!(
            holding("(a frame entered during the transition)").to_string(),
            "tid 7 (w): holds (a frame entered during the transition) [old] (frame 2), running"
        );
    }
}
