//! The trace directory's on-disk format, shared by the writer
//! ([`crate::start`]) and the reader ([`crate::tracedata`]).
//!
//! See the [crate documentation](crate), section "On-disk
//! format", for the description; this module holds the constants, the
//! event encoding, the checksum and the serde types of the JSON files.
//!
//! # Events (version 2)
//!
//! A thread's events are a stream of little-endian 64-bit words, the same
//! in the ring segments and on disk. A *compact* event is one word:
//!
//! ```text
//!  63          38 37            16 15         2 1   0
//! | delta (26)   | function (22)   | depth (14)  | kind |
//! ```
//!
//! `kind` is [`KIND_ENTRY`], [`KIND_EXIT`] or [`KIND_EXIT_VALUE`] (an exit
//! followed by one word: the function's return value); `delta` is the
//! event's time minus the time of the thread's previous event (or of the
//! last sync record), in clock ticks; `depth` is the number of traced
//! frames below the function on the thread's shadow stack (below
//! `trace::MAX_DEPTH`, so it is exact); `function` is the id in the
//! trace's symbol file. An event that does not fit (a delta of 2^26 ticks
//! or more, about 25 ms at 2.6 GHz; an id of 2^22 or more) is written as a
//! [`SPECIAL_LONG`] record instead.
//!
//! A *special* record is a word with kind 0, then `n` payload words:
//!
//! ```text
//!  63                    16 15     8 7        2 1   0
//! | argument (48)          | n (8)   | type (6)  |  0   |
//! ```
//!
//! - [`SPECIAL_SYNC`] (argument: the depth of the next event; payload:
//!   the time the next delta counts from, the number of events lost just
//!   before this point, the segment's sequence number) starts every ring
//!   segment: a reader can start decoding at any segment, and a gap where
//!   events were lost is marked where it happened, with the depth to
//!   resume at.
//! - [`SPECIAL_LONG`] (argument: the kind; payload: the absolute time,
//!   `function | depth << 32`, and for [`KIND_EXIT_VALUE`] the value).
//! - [`SPECIAL_LOST`] (argument: events lost here; no payload).
//! - [`SPECIAL_CUT`] (argument: events not recorded here because a signal
//!   handler made calls while its thread was inside the tracer or the
//!   recorder — its calls are counted, not recorded; what is around them
//!   is unaffected; no payload).
//!
//! Readers skip special records of types they do not know (their length
//! is in the word), so new types do not need a new version.

use serde::{Deserialize, Serialize};

pub use textpoke::clock::{ClockInfo, ClockSource};

/// How [`ClockSource`] is written in `meta.json` (the engine's clock has no
/// serde: this is serde's "remote" definition of it, field for field).
#[derive(Serialize, Deserialize)]
#[serde(remote = "ClockSource", rename_all = "snake_case")]
enum ClockSourceDef {
    Tsc,
    TscUnordered,
    Monotonic,
}

/// How [`ClockInfo`] is written in `meta.json` (`#[serde(with =
/// "ClockInfoDef")]` on a field of that type), as [`ClockSourceDef`].
#[derive(Serialize, Deserialize)]
#[serde(remote = "ClockInfo")]
pub(crate) struct ClockInfoDef {
    #[serde(with = "ClockSourceDef")]
    source: ClockSource,
    ticks_per_sec: f64,
    mult: u64,
    shift: u32,
    base_ticks: u64,
    base_ns: u64,
    calibration_ns: u64,
}

/// The format version written by this build and the only one it reads.
pub const FORMAT_VERSION: u32 = 2;
/// `format` field of `meta.json`.
pub const FORMAT_NAME: &str = "textpoke-trace";
/// The metadata file; its `complete` field is written `true` last.
pub const META_FILE: &str = "meta.json";
/// The symbol file: one JSON object per line, for the functions that
/// appear in the trace (appended as the writer first sees them).
pub const SYMBOLS_FILE: &str = "symbols.jsonl";
/// Exact per-function call counts, summed over threads.
pub const COUNTS_FILE: &str = "counts.json";
/// A forked child's trace directory is `child-<pid>` inside its parent's.
pub const CHILD_DIR_PREFIX: &str = "child-";

/// First 8 bytes of a per-thread event file.
pub const THREAD_MAGIC: [u8; 8] = *b"TPKTHRD\0";
/// Length of a per-thread event file's header.
pub const THREAD_HEADER_LEN: usize = 32;
/// The unit of the event stream: one word.
pub const WORD: usize = 8;

/// Event kind: a function was entered.
pub const KIND_ENTRY: u8 = 1;
/// Event kind: a function returned.
pub const KIND_EXIT: u8 = 2;
/// Event kind: a function returned; the next word is its return value.
pub const KIND_EXIT_VALUE: u8 = 3;

/// Special record: start of a segment (see the module docs).
pub const SPECIAL_SYNC: u8 = 1;
/// Special record: an event that does not fit a compact word.
pub const SPECIAL_LONG: u8 = 2;
/// Special record: events lost at this point.
pub const SPECIAL_LOST: u8 = 3;
/// Special record: events of calls a signal handler made while its thread
/// was inside the tracer or recorder (the recursion guard), not recorded;
/// the calls around them nest as recorded.
pub const SPECIAL_CUT: u8 = 4;

/// Bits of a compact event's depth, function and delta fields.
pub const DEPTH_BITS: u32 = 14;
pub const FUNC_BITS: u32 = 22;
pub const DELTA_BITS: u32 = 26;
/// Shifts of the fields in a compact event.
pub const DEPTH_SHIFT: u32 = 2;
pub const FUNC_SHIFT: u32 = 16;
pub const DELTA_SHIFT: u32 = 38;
const _: () = assert!(DEPTH_SHIFT + DEPTH_BITS == FUNC_SHIFT && FUNC_SHIFT + FUNC_BITS == DELTA_SHIFT);
const _: () = assert!(DELTA_SHIFT + DELTA_BITS == 64);
const _: () = assert!(textpoke::trace::MAX_DEPTH < 1 << DEPTH_BITS);

/// Words of a sync record, header included.
pub const SYNC_WORDS: usize = 4;

/// A compact event word, or `None` if a field does not fit.
#[inline]
pub fn compact(kind: u8, func: u32, depth: u32, delta: u64) -> Option<u64> {
    let fits = (func as u64) < 1 << FUNC_BITS && (depth as u64) < 1 << DEPTH_BITS && delta < 1 << DELTA_BITS;
    fits.then_some(kind as u64 | (depth as u64) << DEPTH_SHIFT | (func as u64) << FUNC_SHIFT | delta << DELTA_SHIFT)
}

/// The header word of a special record of type `ty` with `n` payload
/// words and a 48-bit `arg`.
#[inline]
pub fn special(ty: u8, n: u8, arg: u64) -> u64 {
    ((ty as u64) << 2) | (n as u64) << 8 | (arg & ((1 << 48) - 1)) << 16
}

/// One event as the reader hands it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// [`KIND_ENTRY`], [`KIND_EXIT`] or [`KIND_EXIT_VALUE`].
    pub kind: u8,
    pub func: u32,
    pub depth: u32,
    /// Clock ticks.
    pub ts: u64,
    /// The return value ([`KIND_EXIT_VALUE`]).
    pub value: Option<u64>,
}

/// One decoded record of a thread's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Item {
    /// An entry or exit.
    Event(Event),
    /// A segment start: `lost` events were lost just before it, and the
    /// next event is at `depth`.
    Sync { depth: u32, lost: u64, seq: u64, base_ts: u64 },
    /// `count` events were lost here.
    Lost { count: u64 },
    /// `count` events of a signal handler's calls were not recorded here.
    Cut { count: u64 },
}

/// Why a stream does not decode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// Word index in the stream.
    pub word: u64,
    pub what: String,
}

/// Decodes a thread's event stream incrementally: feed whole words (any
/// split; a record cut between two calls is completed by the next one).
#[derive(Clone, Debug, Default)]
pub struct Decoder {
    /// The time the next compact delta counts from; `None` before the
    /// first sync or long record (a compact event then is an error).
    time: Option<u64>,
    /// Words of a record begun but not complete.
    pending: Vec<u64>,
    /// Words consumed so far.
    words: u64,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Words consumed so far.
    pub fn words(&self) -> u64 {
        self.words
    }

    /// Whether a record was begun and not completed (at the end of a
    /// stream: it is truncated).
    pub fn in_record(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The time the next delta counts from.
    pub fn time(&self) -> Option<u64> {
        self.time
    }

    /// Decodes `words`, handing each complete item to `sink`. Stops at the
    /// first invalid record.
    pub fn feed(&mut self, words: &[u64], sink: &mut impl FnMut(Item)) -> Result<(), DecodeError> {
        for &w in words {
            self.words += 1;
            if self.pending.is_empty() {
                if w & 3 != 0 && w & 3 != KIND_EXIT_VALUE as u64 {
                    let item = self.compact(w)?;
                    sink(item);
                    continue;
                }
                self.pending.push(w);
            } else {
                self.pending.push(w);
            }
            if self.pending.len() == self.record_words() {
                let rec = std::mem::take(&mut self.pending);
                let item = self.record(&rec)?;
                self.pending = rec;
                self.pending.clear();
                if let Some(item) = item {
                    sink(item);
                }
            }
        }
        Ok(())
    }

    /// Words of the record whose first word is pending.
    fn record_words(&self) -> usize {
        let w = self.pending[0];
        if w & 3 == KIND_EXIT_VALUE as u64 {
            2
        } else {
            1 + ((w >> 8) & 0xff) as usize
        }
    }

    fn err(&self, what: impl Into<String>) -> DecodeError {
        DecodeError { word: self.words - 1, what: what.into() }
    }

    fn compact(&mut self, w: u64) -> Result<Item, DecodeError> {
        let Some(t) = self.time else {
            return Err(self.err("an event before the first sync record"));
        };
        let Some(ts) = t.checked_add(w >> DELTA_SHIFT) else {
            return Err(self.err("the time passes 2^64 ticks"));
        };
        self.time = Some(ts);
        let func = ((w >> FUNC_SHIFT) & ((1 << FUNC_BITS) - 1)) as u32;
        let depth = ((w >> DEPTH_SHIFT) & ((1 << DEPTH_BITS) - 1)) as u32;
        Ok(Item::Event(Event { kind: (w & 3) as u8, func, depth, ts, value: None }))
    }

    fn record(&mut self, rec: &[u64]) -> Result<Option<Item>, DecodeError> {
        let w = rec[0];
        if w & 3 == KIND_EXIT_VALUE as u64 {
            let Item::Event(mut e) = self.compact(w)? else { unreachable!("compact gives events") };
            e.value = Some(rec[1]);
            return Ok(Some(Item::Event(e)));
        }
        let ty = ((w >> 2) & 0x3f) as u8;
        let arg = w >> 16;
        let p = &rec[1..];
        match ty {
            SPECIAL_SYNC if p.len() >= 3 => {
                self.time = Some(p[0]);
                Ok(Some(Item::Sync { depth: arg as u32, lost: p[1], seq: p[2], base_ts: p[0] }))
            }
            SPECIAL_LONG if p.len() >= 2 => {
                let kind = arg as u8;
                let want = if kind == KIND_EXIT_VALUE { 3 } else { 2 };
                if !(KIND_ENTRY..=KIND_EXIT_VALUE).contains(&kind) || p.len() < want {
                    return Err(self.err(format!("long event of kind {kind} with {} payload words", p.len())));
                }
                if self.time.is_some_and(|t| p[0] < t) {
                    return Err(self.err("time goes backwards"));
                }
                self.time = Some(p[0]);
                let value = (kind == KIND_EXIT_VALUE).then(|| p[2]);
                let (func, depth) = (p[1] as u32, (p[1] >> 32) as u32);
                Ok(Some(Item::Event(Event { kind, func, depth, ts: p[0], value })))
            }
            SPECIAL_LOST => Ok(Some(Item::Lost { count: arg })),
            SPECIAL_CUT => Ok(Some(Item::Cut { count: arg })),
            SPECIAL_SYNC | SPECIAL_LONG => Err(self.err(format!("special record {ty} too short"))),
            0 => Err(self.err("special record of type 0")),
            _ => Ok(None), // a type this build does not know: skipped
        }
    }
}

/// Encodes events as a thread's stream, the inverse of [`Decoder`]: a
/// sync record first, then each event as a compact word when it fits, else
/// a long record. For tests and tools that write traces; the recorder
/// itself encodes in its hot path.
#[derive(Clone, Debug, Default)]
pub struct Encoder {
    time: Option<u64>,
    seq: u64,
    words: Vec<u64>,
}

impl Encoder {
    pub fn new() -> Encoder {
        Encoder::default()
    }

    /// A sync record: the next delta counts from `base_ts`, `lost` events
    /// were lost just before, the next event is at `depth`.
    pub fn sync(&mut self, depth: u32, lost: u64, base_ts: u64) {
        self.words.extend([special(SPECIAL_SYNC, 3, depth as u64), base_ts, lost, self.seq]);
        self.seq += 1;
        self.time = Some(base_ts);
    }

    /// An event (its `value` only for [`KIND_EXIT_VALUE`]). Times must not
    /// go backwards.
    pub fn event(&mut self, e: &Event) {
        let t = *self.time.get_or_insert_with(|| {
            self.words.extend([special(SPECIAL_SYNC, 3, e.depth as u64), e.ts, 0, 0]);
            self.seq = 1;
            e.ts
        });
        match compact(e.kind, e.func, e.depth, e.ts.wrapping_sub(t)).filter(|_| e.ts >= t) {
            Some(w) => self.words.push(w),
            None => {
                let n = if e.kind == KIND_EXIT_VALUE { 3 } else { 2 };
                self.words.extend([
                    special(SPECIAL_LONG, n, e.kind as u64),
                    e.ts,
                    e.func as u64 | (e.depth as u64) << 32,
                ]);
            }
        }
        if e.kind == KIND_EXIT_VALUE {
            self.words.push(e.value.unwrap_or(0));
        }
        self.time = Some(e.ts);
    }

    /// The words so far.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The bytes of the words (little-endian).
    pub fn bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

/// The header of a per-thread event file.
pub fn thread_header(tid: i32) -> [u8; THREAD_HEADER_LEN] {
    let mut h = [0u8; THREAD_HEADER_LEN];
    h[0..8].copy_from_slice(&THREAD_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(WORD as u32).to_le_bytes());
    h[16..20].copy_from_slice(&tid.to_le_bytes());
    h
}

/// Checks a per-thread event file's header (the inverse of
/// [`thread_header`]); returns the thread id it names, or what is wrong.
pub fn parse_thread_header(h: &[u8; THREAD_HEADER_LEN]) -> Result<i32, String> {
    if h[0..8] != THREAD_MAGIC {
        return Err("wrong magic; not a textpoke thread file".into());
    }
    let le32 = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    if le32(8) != FORMAT_VERSION {
        return Err(format!(
            "format version {}, this textpoke reads version {FORMAT_VERSION} (record the trace again with this textpoke, or read it with the textpoke that wrote it)",
            le32(8)
        ));
    }
    if le32(12) != WORD as u32 {
        return Err(format!("word length {}, expected {WORD}", le32(12)));
    }
    if h[20..].iter().any(|&b| b != 0) {
        return Err("reserved bytes are not zero".into());
    }
    Ok(le32(16) as i32)
}

/// Initial value of an event file's checksum.
pub const CHECKSUM_SEED: u64 = 0x7465_7874_706f_6b65; // "textpoke"

/// Folds one word into a running checksum.
///
/// Each step `h' = (rotl(h, 5) ^ w) * K` (K odd) is a bijection of `w` for
/// a fixed `h` and of `h` for a fixed `w`, so changing any one word of the
/// file (any number of bit flips in it) always changes the result.
#[inline]
pub fn checksum_step(h: u64, w: u64) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    (h.rotate_left(5) ^ w).wrapping_mul(K)
}

/// What the recorder recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Entry and exit events with timestamps, and exact call counts.
    Record,
    /// Per-function call counts only.
    Count,
}

/// What the recorder does with new events once a buffer may not grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Drop the new events, count them, and mark the gap in the stream
    /// where recording resumes (LTTng's discard mode). The default: the
    /// program never waits for the tracer, and what was kept is exact.
    Discard,
    /// Keep the newest events: nothing is written while the program runs;
    /// the oldest segments are discarded as memory fills, and what is left
    /// is written at the end (ftrace's overwrite mode; a flight recorder).
    Overwrite,
}

/// One thread's entry in `meta.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadMeta {
    /// Kernel thread id.
    pub tid: i32,
    /// Event file name inside the directory (record mode), else `None`.
    pub file: Option<String>,
    /// Words in the file after its header.
    pub words: u64,
    /// Entry and exit events in the file.
    pub entries: u64,
    pub exits: u64,
    /// Events lost because the thread's buffer could not grow (its own or
    /// the overall memory limit), or overwritten (flight recorder).
    pub lost: u64,
    /// Events lost because a signal handler recorded while this thread was
    /// inside a record call.
    pub dropped_nested: u64,
    /// Calls not counted because the function id exceeded `max_functions`.
    pub dropped_range: u64,
    /// Calls counted on this thread (exact, also when events were lost).
    pub calls: u64,
    /// Time of the first and last event (0 when none).
    pub first_ts: u64,
    /// See `first_ts`.
    pub last_ts: u64,
    /// Checksum of the file's words, hex ([`checksum_step`]).
    pub checksum: String,
    /// Whether the thread had exited when this was written.
    pub exited: bool,
}

impl ThreadMeta {
    /// Events this thread lost, all causes (buffer limits, nesting).
    pub fn dropped(&self) -> u64 {
        self.lost + self.dropped_nested
    }
}

/// Events lost that no thread's buffer could count.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnattributedDrops {
    /// A signal handler recorded while its thread was creating its buffer.
    pub creating: u64,
    /// An event after the thread's buffer was retired (thread exit).
    pub exiting: u64,
    /// The thread's first buffer could not be mapped (out of memory, or
    /// the memory limit reached).
    pub no_memory: u64,
    /// An event on the writer thread itself.
    pub writer_thread: u64,
    /// Events drained but not written because writing the file failed.
    pub io: u64,
    /// Threads still inside a record call when the final flush gave up
    /// waiting: each may have lost one event (or one count).
    pub in_flight_at_stop: u64,
}

impl UnattributedDrops {
    /// Sum of all fields.
    pub fn total(&self) -> u64 {
        self.creating + self.exiting + self.no_memory + self.writer_thread + self.io + self.in_flight_at_stop
    }
}

/// How a recording ended early: a fatal signal, for which the thread it
/// hit wrote everything the buffers held (the crash flush,
/// [`crate::crash`]). The process normally died of it right after.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalEnd {
    /// The signal number.
    pub signal: i32,
    /// Its name (`SIGSEGV`, …; `signal N` for others).
    pub name: String,
    /// The thread that received it.
    pub tid: i32,
    /// `si_code`: why (`SEGV_MAPERR`, …) or who (`SI_USER`, `SI_TKILL`).
    pub code: i32,
    /// The faulting address, for a fault the kernel reported (`si_code` >
    /// 0: `SIGSEGV`, `SIGBUS`, `SIGILL`, `SIGFPE`).
    pub addr: Option<u64>,
    /// The process that sent it, for a signal sent with `kill`, `raise`
    /// or `abort` (`si_code` <= 0).
    pub sender_pid: Option<i32>,
    /// The time of the flush (clock ticks).
    pub ts: u64,
    /// Events the flush took from the threads' buffers: recorded after
    /// the writer's last pass, they would have been lost with the process.
    /// (What the writer had taken and still held in its own buffers was
    /// written too, and is not counted here.)
    pub flushed_events: u64,
}

impl SignalEnd {
    /// The name of signal `sig` as the crash flush writes it.
    pub fn signal_name(sig: i32) -> &'static str {
        match sig {
            libc::SIGSEGV => "SIGSEGV",
            libc::SIGBUS => "SIGBUS",
            libc::SIGILL => "SIGILL",
            libc::SIGFPE => "SIGFPE",
            libc::SIGABRT => "SIGABRT",
            libc::SIGTRAP => "SIGTRAP",
            libc::SIGSYS => "SIGSYS",
            libc::SIGQUIT => "SIGQUIT",
            libc::SIGTERM => "SIGTERM",
            libc::SIGINT => "SIGINT",
            libc::SIGHUP => "SIGHUP",
            libc::SIGKILL => "SIGKILL",
            _ => "signal",
        }
    }

    /// What the code says, in words (`address not mapped`, `raised by the
    /// process itself`…), if known. `pid` is the traced process's.
    pub fn reason(&self, pid: i32) -> Option<&'static str> {
        let own = self.sender_pid == Some(pid);
        Some(match (self.signal, self.code) {
            (libc::SIGABRT, libc::SI_TKILL) if own => "abort(), a failed assert() or raise()",
            (_, libc::SI_TKILL) if own => "raised by the process itself",
            (_, libc::SI_USER) if own => "sent by the process to itself",
            (_, libc::SI_USER | libc::SI_TKILL) => "sent by another process",
            (_, libc::SI_QUEUE) => "sent with sigqueue",
            (_, 0x80) => "a general protection fault: a non-canonical address or a privileged instruction",
            (libc::SIGSEGV, 1) => "address not mapped",
            (libc::SIGSEGV, 2) => "access not permitted",
            (libc::SIGBUS, 1) => "misaligned address",
            (libc::SIGBUS, 2) => "no memory behind the address (past the end of a mapped file?)",
            (libc::SIGBUS, 3) => "hardware error",
            (libc::SIGILL, 1) => "illegal opcode",
            (libc::SIGILL, 2) => "illegal operand",
            (libc::SIGILL, 5) => "privileged opcode",
            (libc::SIGFPE, 1) => "integer division by zero",
            (libc::SIGFPE, 2) => "integer overflow",
            (libc::SIGFPE, 3..=8) => "floating-point exception",
            _ => return None,
        })
    }

    /// `SIGSEGV (address not mapped, at 0x10) on thread 4242`, for
    /// people; `pid` is the traced process's.
    pub fn describe(&self, pid: i32) -> String {
        let mut why = Vec::new();
        if let Some(r) = self.reason(pid) {
            why.push(r.to_string());
        }
        if let Some(a) = self.addr {
            why.push(format!("at {a:#x}"));
        }
        if let Some(p) = self.sender_pid.filter(|&p| p != pid) {
            why.push(format!("pid {p}"));
        }
        let name = if self.name == "signal" { format!("signal {}", self.signal) } else { self.name.clone() };
        let why = if why.is_empty() { String::new() } else { format!(" ({})", why.join(", ")) };
        format!("{name}{why} on thread {}", self.tid)
    }
}

/// How the buffers were sized.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferInfo {
    /// Bytes of one ring segment.
    pub segment_bytes: u64,
    /// The most one thread's buffer may hold, bytes.
    pub thread_limit: u64,
    /// The most all buffers together may hold, bytes.
    pub memory_limit: u64,
    /// What happened to events past a limit.
    pub policy: FullPolicy,
    /// The most memory the buffers held at once, bytes.
    pub peak_bytes: u64,
}

/// `meta.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// Written `true` by the final flush, after every other file.
    pub complete: bool,
    /// Record or count-only.
    pub mode: Mode,
    /// The traced process.
    pub pid: i32,
    /// For a forked child's trace, its parent's pid.
    pub parent_pid: Option<i32>,
    /// `/proc/self/comm` (or the name given in the configuration).
    pub process_name: String,
    /// `/proc/self/exe`, when readable.
    pub exe: Option<String>,
    /// How to convert timestamps.
    #[serde(with = "ClockInfoDef")]
    pub clock: ClockInfo,
    /// Wall-clock time at the start, nanoseconds since the Unix epoch.
    pub start_unix_ns: u64,
    /// Timestamp (clock ticks) at the start.
    pub start_ts: u64,
    /// Timestamp at the end (final flush), when complete.
    pub end_ts: Option<u64>,
    /// Buffer sizes and policy.
    pub buffers: BufferInfo,
    /// Size of the per-thread counter arrays (ids at or above it are not
    /// counted: `dropped_range`).
    pub max_functions: u32,
    /// Every thread that recorded.
    pub threads: Vec<ThreadMeta>,
    /// Drops not attributable to one thread.
    pub unattributed_drops: UnattributedDrops,
    /// Calls counted while their thread had no buffer to count them in (a
    /// signal handler during the buffer's creation, a destructor after the
    /// thread's buffer was retired): in `counts.json`, not in a thread's
    /// `calls`.
    #[serde(default)]
    pub unattributed_calls: u64,
    /// Total entry and exit events written (sum over threads).
    pub total_events: u64,
    /// Total events lost (threads and unattributed).
    pub total_dropped: u64,
    /// Total calls counted (exact): the threads' and `unattributed_calls`.
    pub total_calls: u64,
    /// Set when the recording ended with a fatal signal whose handler
    /// flushed the trace (then `complete` is false); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_by: Option<SignalEnd>,
}

/// One line of the symbol file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Symbol {
    /// The function id used in events and counts.
    pub id: u32,
    /// The address it was registered with (function entry or descriptor).
    pub addr: u64,
    /// The function's name.
    pub name: String,
}

/// `counts.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountsFile {
    /// `[function id, calls]` for every function called at least once,
    /// sorted by id; summed over all threads.
    pub calls: Vec<(u32, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(words: &[u64]) -> Result<Vec<Item>, DecodeError> {
        let mut out = Vec::new();
        Decoder::new().feed(words, &mut |i| out.push(i))?;
        Ok(out)
    }

    #[test]
    fn signal_ends_are_described_for_people() {
        let end = |signal, code, addr, sender_pid| SignalEnd {
            signal,
            name: SignalEnd::signal_name(signal).into(),
            tid: 7,
            code,
            addr,
            sender_pid,
            ts: 0,
            flushed_events: 0,
        };
        let d = |e: SignalEnd| e.describe(100);
        assert_eq!(d(end(libc::SIGSEGV, 1, Some(0), None)), "SIGSEGV (address not mapped, at 0x0) on thread 7");
        assert_eq!(
            d(end(libc::SIGSEGV, 0x80, None, None)),
            "SIGSEGV (a general protection fault: a non-canonical address or a privileged instruction) on thread 7"
        );
        assert_eq!(
            d(end(libc::SIGABRT, libc::SI_TKILL, None, Some(100))),
            "SIGABRT (abort(), a failed assert() or raise()) on thread 7"
        );
        assert_eq!(
            d(end(libc::SIGBUS, libc::SI_USER, None, Some(55))),
            "SIGBUS (sent by another process, pid 55) on thread 7"
        );
        assert_eq!(d(end(libc::SIGUSR1, 99, None, None)), "signal 10 on thread 7");
    }

    #[test]
    fn compact_events_roundtrip_after_a_sync() {
        let sync = [special(SPECIAL_SYNC, 3, 5), 1000, 7, 1];
        let e = compact(KIND_ENTRY, 77, 5, 12).unwrap();
        let x = compact(KIND_EXIT_VALUE, 77, 5, 30).unwrap();
        let words = [&sync[..], &[e, x, 0xdead_beef]].concat();
        let items = decode_all(&words).unwrap();
        assert_eq!(items[0], Item::Sync { depth: 5, lost: 7, seq: 1, base_ts: 1000 });
        assert_eq!(items[1], Item::Event(Event { kind: KIND_ENTRY, func: 77, depth: 5, ts: 1012, value: None }));
        assert_eq!(
            items[2],
            Item::Event(Event { kind: KIND_EXIT_VALUE, func: 77, depth: 5, ts: 1042, value: Some(0xdead_beef) })
        );
    }

    #[test]
    fn fields_that_do_not_fit_are_refused() {
        assert!(compact(KIND_ENTRY, 1 << FUNC_BITS, 0, 0).is_none());
        assert!(compact(KIND_ENTRY, 0, 1 << DEPTH_BITS, 0).is_none());
        assert!(compact(KIND_ENTRY, 0, 0, 1 << DELTA_BITS).is_none());
        assert!(compact(KIND_ENTRY, (1 << FUNC_BITS) - 1, (1 << DEPTH_BITS) - 1, (1 << DELTA_BITS) - 1).is_some());
    }

    #[test]
    fn records_split_across_feeds_and_unknown_types_skipped() {
        let long = [special(SPECIAL_LONG, 3, KIND_EXIT_VALUE as u64), 5 << 40, 9 | 3 << 32, 42];
        let unknown = [special(40, 2, 0), 1, 2];
        let e = compact(KIND_ENTRY, 9, 3, 1).unwrap();
        let words = [&long[..], &unknown[..], &[e]].concat();
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for w in words.chunks(1) {
            d.feed(w, &mut |i| out.push(i)).unwrap();
        }
        assert!(!d.in_record());
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0],
            Item::Event(Event { kind: KIND_EXIT_VALUE, func: 9, depth: 3, ts: 5 << 40, value: Some(42) })
        );
        assert_eq!(out[1], Item::Event(Event { kind: KIND_ENTRY, func: 9, depth: 3, ts: (5 << 40) + 1, value: None }));
    }

    #[test]
    fn malformed_streams_are_errors() {
        assert!(decode_all(&[compact(KIND_ENTRY, 1, 0, 0).unwrap()]).is_err(), "event before any time base");
        assert!(decode_all(&[special(0, 0, 0)]).is_err(), "type 0");
        assert!(decode_all(&[special(SPECIAL_SYNC, 1, 0), 5]).is_err(), "short sync");
        let back = [special(SPECIAL_SYNC, 3, 0), 100, 0, 0, special(SPECIAL_LONG, 2, 1), 50, 1];
        assert!(decode_all(&back).is_err(), "time going backwards");
    }

    #[test]
    fn encoder_and_decoder_agree() {
        let evs = [
            Event { kind: KIND_ENTRY, func: 3, depth: 0, ts: 100, value: None },
            Event { kind: KIND_ENTRY, func: 1 << 23, depth: 1, ts: 110, value: None },
            Event { kind: KIND_EXIT_VALUE, func: 1 << 23, depth: 1, ts: 110 + (1 << 30), value: Some(7) },
            Event { kind: KIND_EXIT, func: 3, depth: 0, ts: 111 + (1 << 30), value: None },
        ];
        let mut enc = Encoder::new();
        for e in &evs[..2] {
            enc.event(e);
        }
        enc.sync(1, 12, 110);
        for e in &evs[2..] {
            enc.event(e);
        }
        let items = decode_all(enc.words()).unwrap();
        let got: Vec<Event> =
            items.iter().filter_map(|i| if let Item::Event(e) = i { Some(*e) } else { None }).collect();
        assert_eq!(got, evs);
        assert!(items.contains(&Item::Sync { depth: 1, lost: 12, seq: 1, base_ts: 110 }));
    }

    #[test]
    fn checksum_sees_any_word_change() {
        let a = checksum_step(CHECKSUM_SEED, 5);
        assert_ne!(a, checksum_step(CHECKSUM_SEED, 5 ^ 1 << 40));
        assert_ne!(checksum_step(a, 1), checksum_step(a, 2));
    }

    #[test]
    fn clock_conversion() {
        // 2.5 GHz: 0.4 ns per tick.
        let mult = ((1u128 << 32) * 2 / 5) as u64;
        let c = ClockInfo {
            source: ClockSource::Tsc,
            ticks_per_sec: 2.5e9,
            mult,
            shift: 32,
            base_ticks: 1000,
            base_ns: 10,
            calibration_ns: 0,
        };
        assert_eq!(c.to_ns(1000), 10);
        assert_eq!(c.to_ns(1000 + 2_500_000_000), 10 + 1_000_000_000 - 1); // rounding down of mult
        assert_eq!(c.delta_ns(0, 25), 9);
        assert_eq!(c.to_ns(0), 0, "before the base clamps at 0");
    }
}
