//! The recording op: the recorder as a client of the tracer, like any op.
//! Entry and exit events (with return values for the functions asked
//! for) and exact call counts, or call counts only; with its own inline
//! code for the tracer's trampolines ([`super::codegen`]).

use super::buffer;
use super::codegen;
use std::sync::atomic::{AtomicU64, Ordering};
use textpoke::funcs::{self, FuncId};
use textpoke::trace::{Entry, Exit, Filter, InlineCode, TraceOp};

/// Bit per function id: record its return value. Read by the exit code
/// (generated and Rust); set by [`RecordOp::functions_added`]. One table
/// for the process: one recording runs at a time.
static RETVAL: [AtomicU64; funcs::MAX_FUNCTIONS / 64] = [const { AtomicU64::new(0) }; funcs::MAX_FUNCTIONS / 64];

/// Address of the return-value bitmap, for the generated exit code.
pub(crate) fn retval_bits() -> usize {
    RETVAL.as_ptr() as usize
}

#[inline(always)]
fn wants_retval(func: u32) -> bool {
    RETVAL.get(func as usize / 64).is_some_and(|w| w.load(Ordering::Relaxed) >> (func % 64) & 1 != 0)
}

/// Records traced calls into the running recording session ([`crate::start`]).
#[derive(Debug, Clone)]
pub struct RecordOp {
    count_only: bool,
    /// Functions whose return values are recorded (uftrace's `-R`).
    retval: Option<Filter>,
}

impl RecordOp {
    /// Entry and exit events with timestamps (function_graph), and exact
    /// call counts. No return values unless [`RecordOp::with_retval`].
    pub fn graph() -> RecordOp {
        RecordOp { count_only: false, retval: None }
    }

    /// Per-function call counts only, the cheapest mode.
    pub fn count_only() -> RecordOp {
        RecordOp { count_only: true, retval: None }
    }

    /// Also records the return value (rax; x0 on aarch64) of the functions `filter`
    /// matches, in their exit events.
    pub fn with_retval(mut self, filter: Filter) -> RecordOp {
        self.retval = Some(filter);
        self
    }
}

impl TraceOp for RecordOp {
    #[inline]
    fn entry(&self, e: &Entry<'_>) {
        if self.count_only {
            super::count(FuncId(e.func));
        } else {
            // The recorder reads the clock itself: one read per event.
            super::entry(FuncId(e.func), e.depth);
        }
    }

    #[inline]
    fn exit(&self, x: &Exit) {
        if wants_retval(x.func) {
            super::exit_value(FuncId(x.func), x.depth, x.retval);
        } else {
            super::exit(FuncId(x.func), x.depth);
        }
    }

    fn wants_exit(&self) -> bool {
        !self.count_only
    }

    fn call_counted(&self, func: u32) {
        super::count(FuncId(func));
    }

    fn call_cut(&self, func: u32) {
        if self.count_only {
            super::count(FuncId(func));
        } else {
            buffer::count_cut(func);
        }
    }

    fn functions_added(&self, ids: std::ops::Range<u32>) {
        if ids.start == 0 {
            // Registered: forget an earlier op's choice.
            for w in RETVAL.iter().filter(|w| w.load(Ordering::Relaxed) != 0) {
                w.store(0, Ordering::Relaxed);
            }
        }
        let Some(filter) = &self.retval else { return };
        for id in ids {
            let Some(f) = funcs::get(FuncId(id)) else { continue };
            if filter.matches(&f.name) {
                RETVAL[id as usize / 64].fetch_or(1 << (id % 64), Ordering::Relaxed);
            }
        }
    }

    /// The fast paths of `codegen` (`codegen/x86_64.rs` or
    /// `codegen/aarch64.rs`, by the target), when the buffers' layout is
    /// known (their thread-local is in the static TLS block).
    fn inline(&self) -> Option<InlineCode> {
        buffer::buffer_layout()?;
        Some(if self.count_only {
            InlineCode::Count { count: codegen::emit_count }
        } else {
            InlineCode::Graph { entry: codegen::emit_entry, exit: codegen::emit_exit }
        })
    }
}
