//! Rebuilding one thread's call stack from its entry and exit records.
//!
//! See the [module documentation](super) for the algorithm; this file is
//! its implementation, [`Rebuilder`], and the [`Event`]s it emits.

use std::collections::HashMap;
use textpoke_record::format::ClockInfo;
use textpoke_record::tracedata::{Record, RecordKind};
use textpoke_record::FuncId;

/// How a call was closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Closed {
    /// Its exit record was found.
    Returned,
    /// Its exit record is missing, but a caller's exit arrived: it ended
    /// before that, and is closed there (a dropped record, `longjmp`, an
    /// exception that unwound it without an exit record).
    ExitLost,
    /// Still open when the thread's records ended (the trace stopped
    /// inside it, or the thread was in it at exit): closed at the thread's
    /// last timestamp, so its time is a lower bound.
    Unfinished,
    /// Open when events were lost ([`Event::Gap`]): whether and when it
    /// returned is not known, so it has no time (`total_ns` and `self_ns`
    /// are 0 and `end` is the time of the last event before the gap).
    Gap,
}

/// One call, once it is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    /// The function.
    pub func: FuncId,
    /// Stack level in the rebuilt stack: 0 for a call with no traced
    /// caller on this thread.
    pub level: usize,
    /// Depth as the tracer recorded it at entry.
    pub depth: u32,
    /// Timestamp (clock ticks) of the entry.
    pub start: u64,
    /// Timestamp of the exit (or where it was closed, see [`Closed`]).
    pub end: u64,
    /// Inclusive time, nanoseconds.
    pub total_ns: u64,
    /// `total_ns` minus the inclusive time of its traced callees.
    pub self_ns: u64,
    /// How it was closed.
    pub closed: Closed,
    /// The return value, when the exit recorded one.
    pub value: Option<u64>,
}

/// What the rebuilder tells its consumer, in order. `Enter` and `Leave`
/// events nest properly: every `Leave` closes the most recent `Enter` not
/// yet left, and every `Enter` is left before the thread's last event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A call starts, at stack level `level`.
    Enter {
        /// The function.
        func: FuncId,
        /// Its stack level (0: no traced caller).
        level: usize,
        /// Entry timestamp (ticks).
        ts: u64,
    },
    /// A call ends.
    Leave(Call),
    /// An exit record with no open call of its function: the trace started
    /// inside that call, or its entry was lost in a gap (`after_gap`).
    /// Ignored for timing.
    OrphanExit {
        /// The function.
        func: FuncId,
        /// Exit timestamp (ticks).
        ts: u64,
        /// Whether a gap came before it on this thread.
        after_gap: bool,
    },
    /// `count` events of a signal handler's calls were not recorded here
    /// (it ran while the thread was inside the tracer); nothing else is
    /// affected.
    Cut {
        /// Events not recorded.
        count: u64,
        /// Time of the last event before (ticks).
        ts: u64,
    },
    /// `lost` events were lost here; every call open before was closed as
    /// [`Closed::Gap`] just before this event, and the calls after it
    /// start at stack level `level` (the depth recording resumed at: their
    /// callers are not known).
    Gap {
        /// Events lost.
        lost: u64,
        /// Time of the last event before the gap (ticks).
        ts: u64,
        /// The level the next calls start at.
        level: usize,
    },
}

#[derive(Clone, Copy, Debug)]
struct Frame {
    func: FuncId,
    depth: u32,
    start: u64,
    child_ns: u64,
}

/// The deepest a rebuilt stack may go: a shadow stack is never deeper, and
/// an entry at a recorded depth closes the frames at or above it, so only
/// damaged input could nest deeper; bounded so that it cannot use
/// unbounded memory.
pub const MAX_LEVEL: usize = textpoke::trace::MAX_DEPTH + 1;

/// A stack deeper than this is indexed by function ([`Rebuilder::open`]);
/// the index is dropped when it is back under half of it. A shallower one
/// is looked through, which costs no more than hashing.
const INDEXED: usize = 64;

/// Rebuilds one thread's calls from its records (see the module docs).
///
/// Feed every record of one thread, in order, to [`push`](Self::push),
/// then call [`finish`](Self::finish) once.
#[derive(Debug)]
pub struct Rebuilder<'c> {
    clock: &'c ClockInfo,
    /// The open calls, outermost first. Their recorded depths strictly
    /// increase (an entry first closes the calls at its depth or deeper),
    /// so the call at a depth is found by binary search.
    stack: Vec<Frame>,
    /// While the stack is deep, how many calls of each function are open:
    /// an exit of a function with none open is an orphan without looking
    /// through the stack (see [`INDEXED`]).
    open: Option<HashMap<FuncId, u32>>,
    /// Levels of unknown calls below the stack (after a gap).
    base: usize,
    /// Whether a gap was seen on this thread.
    gapped: bool,
    last_ts: u64,
}

impl<'c> Rebuilder<'c> {
    /// A rebuilder converting ticks with `clock` (the trace's
    /// [`Trace::clock`](textpoke_record::tracedata::Trace::clock)).
    pub fn new(clock: &'c ClockInfo) -> Self {
        Rebuilder { clock, stack: Vec::new(), open: None, base: 0, gapped: false, last_ts: 0 }
    }

    /// The open calls, outermost first, as `(function, entry timestamp)`.
    pub fn open_calls(&self) -> impl Iterator<Item = (FuncId, u64)> + '_ {
        self.stack.iter().map(|f| (f.func, f.start))
    }

    /// The current stack level (open calls, and unknown ones below them
    /// after a gap).
    pub fn level(&self) -> usize {
        self.base + self.stack.len()
    }

    /// Processes one record, reporting what it opens or closes to `sink`.
    pub fn push(&mut self, r: &Record, sink: &mut impl FnMut(Event)) {
        self.last_ts = self.last_ts.max(r.ts);
        match r.kind {
            RecordKind::Entry => self.entry(r, sink),
            RecordKind::Exit => self.exit(r, sink),
            RecordKind::Gap => self.gap(r, sink),
            RecordKind::Cut => sink(Event::Cut { count: r.lost, ts: r.ts }),
        }
    }

    fn entry(&mut self, r: &Record, sink: &mut impl FnMut(Event)) {
        // Calls at this recorded depth or deeper lost their exits (a
        // longjmp, an exception, a full shadow stack): they ended no
        // later than this entry.
        while self.stack.last().is_some_and(|f| f.depth >= r.depth) || self.level() >= MAX_LEVEL {
            if self.stack.is_empty() {
                break;
            }
            self.close(r.ts, Closed::ExitLost, None, sink);
        }
        if self.stack.is_empty() && (r.depth as usize) < self.base {
            self.base = r.depth as usize; // the unknown calls below returned
        }
        sink(Event::Enter { func: r.func, level: self.level(), ts: r.ts });
        self.stack.push(Frame { func: r.func, depth: r.depth, start: r.ts, child_ns: 0 });
        match &mut self.open {
            Some(open) => *open.entry(r.func).or_default() += 1,
            None if self.stack.len() > INDEXED => {
                let mut open = HashMap::new();
                for f in &self.stack {
                    *open.entry(f.func).or_default() += 1;
                }
                self.open = Some(open);
            }
            None => {}
        }
    }

    fn exit(&mut self, r: &Record, sink: &mut impl FnMut(Event)) {
        // 1. The open call of this function at this depth (there is at
        // most one call per depth),
        // 2. else the innermost open call of this function: a deep stack
        // is looked through only when one is open, and the calls looked
        // through are closed then, so that each costs once (a deep stack
        // then a run of orphan exits took 32 s for 10 MB of trace).
        let found = self
            .stack
            .binary_search_by_key(&r.depth, |f| f.depth)
            .ok()
            .filter(|&i| self.stack[i].func == r.func)
            .or_else(|| match &self.open {
                Some(open) if !open.contains_key(&r.func) => None,
                _ => self.stack.iter().rposition(|f| f.func == r.func),
            });
        let Some(i) = found else {
            sink(Event::OrphanExit { func: r.func, ts: r.ts, after_gap: self.gapped });
            return;
        };
        // 3. Calls opened after it lost their exits: they ended no
        // later than this one.
        while self.stack.len() > i + 1 {
            self.close(r.ts, Closed::ExitLost, None, sink);
        }
        self.close(r.ts, Closed::Returned, r.value, sink);
    }

    /// Events were lost: nothing open is known to be still open, and
    /// nothing after is known to be inside it.
    fn gap(&mut self, r: &Record, sink: &mut impl FnMut(Event)) {
        while !self.stack.is_empty() {
            self.close(r.ts, Closed::Gap, None, sink);
        }
        self.base = if r.depth == u32::MAX { 0 } else { (r.depth as usize).min(MAX_LEVEL - 1) };
        self.gapped = true;
        sink(Event::Gap { lost: r.lost, ts: r.ts, level: self.base });
    }

    /// Closes every call still open at the thread's last timestamp, as
    /// [`Closed::Unfinished`]. The rebuilder is then empty and may be
    /// reused for another thread.
    pub fn finish(&mut self, sink: &mut impl FnMut(Event)) {
        while !self.stack.is_empty() {
            self.close(self.last_ts, Closed::Unfinished, None, sink);
        }
        self.last_ts = 0;
        self.base = 0;
        self.gapped = false;
    }

    fn close(&mut self, end: u64, closed: Closed, value: Option<u64>, sink: &mut impl FnMut(Event)) {
        let Some(f) = self.stack.pop() else {
            return;
        };
        if let Some(open) = &mut self.open {
            if self.stack.len() < INDEXED / 2 {
                self.open = None;
            } else if let Some(n) = open.get_mut(&f.func) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&f.func);
                }
            }
        }
        let total_ns = if closed == Closed::Gap { 0 } else { self.clock.delta_ns(f.start, end) };
        if let Some(parent) = self.stack.last_mut() {
            parent.child_ns = parent.child_ns.saturating_add(total_ns);
        }
        sink(Event::Leave(Call {
            func: f.func,
            level: self.base + self.stack.len(),
            depth: f.depth,
            start: f.start,
            end,
            total_ns,
            self_ns: if closed == Closed::Gap { 0 } else { total_ns.saturating_sub(f.child_ns) },
            closed,
            value,
        }));
    }
}
