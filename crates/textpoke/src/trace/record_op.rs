//! The built-in recording op: entry and exit records (with the return
//! value) into the recorder's per-thread rings, or call counts only.

use super::hot::{Entry, Exit, TraceOp};
use crate::record::{self, FuncId};

/// Records traced calls into the running [`crate::record`] session.
#[derive(Debug, Clone, Copy)]
pub struct RecordOp {
    count_only: bool,
}

impl RecordOp {
    /// Entry and exit records with timestamps (function_graph).
    pub fn graph() -> RecordOp {
        RecordOp { count_only: false }
    }
    /// Per-function call counts only, the cheapest mode.
    pub fn count_only() -> RecordOp {
        RecordOp { count_only: true }
    }
}

impl TraceOp for RecordOp {
    #[inline]
    fn entry(&self, e: &Entry<'_>) {
        if self.count_only {
            record::count(FuncId(e.func));
        } else {
            // The recorder reads the clock itself: one read per record.
            record::entry(FuncId(e.func), e.depth);
        }
    }
    #[inline]
    fn exit(&self, x: &Exit) {
        record::exit_value(FuncId(x.func), x.depth, x.retval);
    }
    fn wants_exit(&self) -> bool {
        !self.count_only
    }
    fn counts_only(&self) -> bool {
        self.count_only
    }
    fn records_graph(&self) -> bool {
        !self.count_only
    }
}
