//! The trace directory's on-disk format, shared by the writer
//! ([`crate::record`]) and the reader ([`crate::tracedata`]).
//!
//! See the [`crate::record`] module documentation, section "On-disk
//! format", for the description; this module holds the constants, the
//! record encoding, the checksum and the serde types of the JSON files.

use serde::{Deserialize, Serialize};

/// The format version written by this build and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
/// `format` field of `meta.json`.
pub const FORMAT_NAME: &str = "textpoke-trace";
/// The metadata file; its `complete` field is written `true` last.
pub const META_FILE: &str = "meta.json";
/// The symbol table file.
pub const SYMBOLS_FILE: &str = "symbols.json";
/// The count-only mode's per-function call counts.
pub const COUNTS_FILE: &str = "counts.json";
/// A forked child's trace directory is `child-<pid>` inside its parent's.
pub const CHILD_DIR_PREFIX: &str = "child-";

/// First 8 bytes of a per-thread record file.
pub const THREAD_MAGIC: [u8; 8] = *b"TPKTHRD\0";
/// Length of a per-thread record file's header.
pub const THREAD_HEADER_LEN: usize = 32;
/// Length of one record.
pub const RECORD_LEN: usize = 16;

/// Record kind: a function was entered.
pub const KIND_ENTRY: u8 = 1;
/// Record kind: a function returned.
pub const KIND_EXIT: u8 = 2;
/// Record kind: the 64-bit value (return value) of the exit record just
/// before it; its `ts` field holds the value.
pub const KIND_VALUE: u8 = 3;

/// One record as it is in a ring buffer slot; [`encode`] and [`decode`]
/// give its on-disk form (little-endian, same layout).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RawRecord {
    /// Clock ticks ([`KIND_VALUE`]: the value).
    pub ts: u64,
    /// Function id (an index into the symbol table).
    pub func: u32,
    /// Call depth as the caller gave it, saturated at `u16::MAX`.
    pub depth: u16,
    /// [`KIND_ENTRY`], [`KIND_EXIT`] or [`KIND_VALUE`].
    pub kind: u8,
    /// Reserved, 0.
    pub flags: u8,
}

const _: () = assert!(std::mem::size_of::<RawRecord>() == RECORD_LEN);

/// The on-disk bytes of a record.
#[inline]
pub fn encode(r: &RawRecord) -> [u8; RECORD_LEN] {
    let mut b = [0u8; RECORD_LEN];
    b[0..8].copy_from_slice(&r.ts.to_le_bytes());
    b[8..12].copy_from_slice(&r.func.to_le_bytes());
    b[12..14].copy_from_slice(&r.depth.to_le_bytes());
    b[14] = r.kind;
    b[15] = r.flags;
    b
}

/// A record from its on-disk bytes.
#[inline]
pub fn decode(b: &[u8; RECORD_LEN]) -> RawRecord {
    RawRecord {
        ts: u64::from_le_bytes(b[0..8].try_into().unwrap_or_default()),
        func: u32::from_le_bytes(b[8..12].try_into().unwrap_or_default()),
        depth: u16::from_le_bytes(b[12..14].try_into().unwrap_or_default()),
        kind: b[14],
        flags: b[15],
    }
}

/// The header of a per-thread record file.
pub fn thread_header(tid: i32) -> [u8; THREAD_HEADER_LEN] {
    let mut h = [0u8; THREAD_HEADER_LEN];
    h[0..8].copy_from_slice(&THREAD_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(RECORD_LEN as u32).to_le_bytes());
    h[16..20].copy_from_slice(&tid.to_le_bytes());
    h
}

/// Checks a per-thread record file's header (the inverse of
/// [`thread_header`]); returns the thread id it names, or what is wrong.
pub fn parse_thread_header(h: &[u8; THREAD_HEADER_LEN]) -> Result<i32, String> {
    if h[0..8] != THREAD_MAGIC {
        return Err("wrong magic; not a textpoke thread file".into());
    }
    let le32 = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    if le32(8) != FORMAT_VERSION {
        return Err(format!("version {}, expected {FORMAT_VERSION}", le32(8)));
    }
    if le32(12) != RECORD_LEN as u32 {
        return Err(format!("record length {}, expected {RECORD_LEN}", le32(12)));
    }
    if h[20..].iter().any(|&b| b != 0) {
        return Err("reserved bytes are not zero".into());
    }
    Ok(le32(16) as i32)
}

/// Initial value of a record file's checksum.
pub const CHECKSUM_SEED: u64 = 0x7465_7874_706f_6b65; // "textpoke"

/// Folds one record's bytes into a running checksum.
///
/// Each step `h' = (rotl(h, 5) ^ w) * K` (K odd) is a bijection of `w` for
/// a fixed `h` and of `h` for a fixed `w`, so changing any one 8-byte word
/// of the file (any number of bit flips in it) always changes the result.
#[inline]
pub fn checksum_step(h: u64, rec: &[u8; RECORD_LEN]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let w0 = u64::from_le_bytes(rec[0..8].try_into().unwrap_or_default());
    let w1 = u64::from_le_bytes(rec[8..16].try_into().unwrap_or_default());
    let h = (h.rotate_left(5) ^ w0).wrapping_mul(K);
    (h.rotate_left(5) ^ w1).wrapping_mul(K)
}

/// The clock the timestamps were read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockSource {
    /// `rdtsc`: invariant TSC ticks, converted with a calibrated factor.
    Tsc,
    /// `clock_gettime(CLOCK_MONOTONIC)` nanoseconds.
    Monotonic,
}

impl std::fmt::Display for ClockSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClockSource::Tsc => "tsc",
            ClockSource::Monotonic => "monotonic",
        })
    }
}

/// How to turn a timestamp into `CLOCK_MONOTONIC` nanoseconds:
/// `ns = base_ns + ((ticks - base_ticks) * mult) >> shift`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClockInfo {
    /// Where the ticks come from.
    pub source: ClockSource,
    /// Ticks per second (informative; `mult`/`shift` are exact).
    pub ticks_per_sec: f64,
    /// Fixed-point nanoseconds per tick, scaled by `2^shift`.
    pub mult: u64,
    /// See `mult`.
    pub shift: u32,
    /// A tick count read at `base_ns`.
    pub base_ticks: u64,
    /// `CLOCK_MONOTONIC` nanoseconds at `base_ticks`.
    pub base_ns: u64,
    /// How long the calibration measured, in nanoseconds (0 for monotonic).
    pub calibration_ns: u64,
}

impl ClockInfo {
    /// One tick is one nanosecond from 0 (a monotonic clock, or a TSC
    /// conversion before its calibration).
    pub fn identity(source: ClockSource) -> ClockInfo {
        ClockInfo { source, ticks_per_sec: 1e9, mult: 1, shift: 0, base_ticks: 0, base_ns: 0, calibration_ns: 0 }
    }

    /// `CLOCK_MONOTONIC` nanoseconds of a timestamp.
    pub fn to_ns(&self, ticks: u64) -> u64 {
        let d = ticks as i128 - self.base_ticks as i128;
        let scaled = (d * self.mult as i128) >> self.shift.min(64);
        (self.base_ns as i128 + scaled).clamp(0, u64::MAX as i128) as u64
    }

    /// Nanoseconds between two timestamps (`later - earlier`, 0 if negative).
    pub fn delta_ns(&self, earlier: u64, later: u64) -> u64 {
        let d = later.saturating_sub(earlier) as u128;
        ((d * self.mult as u128) >> self.shift.min(64)).min(u64::MAX as u128) as u64
    }
}

/// What the recorder recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Entry and exit records with timestamps.
    Record,
    /// Per-function call counts only.
    Count,
}

/// One thread's entry in `meta.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadMeta {
    /// Kernel thread id.
    pub tid: i32,
    /// Record file name inside the directory (record mode), else `None`.
    pub file: Option<String>,
    /// Records in the file (entries + exits + values).
    pub records: u64,
    /// Entry records.
    pub entries: u64,
    /// Exit records.
    pub exits: u64,
    /// Records dropped because the ring buffer was full.
    pub dropped_full: u64,
    /// Records dropped because a signal handler recorded while this thread
    /// was inside a record call.
    pub dropped_nested: u64,
    /// Count-only calls whose function id exceeded `max_functions`.
    pub dropped_range: u64,
    /// Count-only mode: calls counted on this thread.
    pub calls: u64,
    /// Timestamp of the first and last record (0 when none).
    pub first_ts: u64,
    /// See `first_ts`.
    pub last_ts: u64,
    /// Checksum of the file's records, hex ([`checksum_step`]).
    pub checksum: String,
    /// Whether the thread had exited when this was written.
    pub exited: bool,
}

impl ThreadMeta {
    /// Records this thread dropped, all causes (full, nested, out of range).
    pub fn dropped(&self) -> u64 {
        self.dropped_full + self.dropped_nested + self.dropped_range
    }
}

/// Records dropped that no thread's buffer could count.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnattributedDrops {
    /// A signal handler recorded while its thread was creating its buffer.
    pub creating: u64,
    /// A record after the thread's buffer was retired (thread exit).
    pub exiting: u64,
    /// The buffer could not be mapped (out of memory).
    pub no_memory: u64,
    /// A record on the writer thread itself.
    pub writer_thread: u64,
    /// Records drained but not written because writing the file failed.
    pub io: u64,
    /// Threads still inside a record call when the final flush gave up
    /// waiting: each may have lost one record (or one count).
    pub in_flight_at_stop: u64,
}

impl UnattributedDrops {
    /// Sum of all fields.
    pub fn total(&self) -> u64 {
        self.creating + self.exiting + self.no_memory + self.writer_thread + self.io + self.in_flight_at_stop
    }
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
    pub clock: ClockInfo,
    /// Wall-clock time at the start, nanoseconds since the Unix epoch.
    pub start_unix_ns: u64,
    /// Timestamp (clock ticks) at the start.
    pub start_ts: u64,
    /// Timestamp at the end (final flush), when complete.
    pub end_ts: Option<u64>,
    /// Ring buffer capacity per thread, records.
    pub buffer_records: u64,
    /// Count-only mode: size of the per-thread counter arrays.
    pub max_functions: u32,
    /// Every thread that recorded.
    pub threads: Vec<ThreadMeta>,
    /// Drops not attributable to one thread.
    pub unattributed_drops: UnattributedDrops,
    /// Total records written (sum over threads).
    pub total_records: u64,
    /// Total records dropped (threads and unattributed).
    pub total_dropped: u64,
}

/// One entry of `symbols.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Symbol {
    /// The function id used in records and counts.
    pub id: u32,
    /// The address the caller registered (function entry or site).
    pub addr: u64,
    /// The function's name as the caller gave it.
    pub name: String,
}

/// `symbols.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SymbolsFile {
    /// Symbols, sorted by id, ids dense from 0.
    pub symbols: Vec<Symbol>,
}

/// `counts.json` (count-only mode).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountsFile {
    /// `[function id, calls]` for every function called at least once,
    /// sorted by id; summed over all threads.
    pub calls: Vec<(u32, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_roundtrip() {
        let r = RawRecord { ts: 0x0102_0304_0506_0708, func: 77, depth: 3, kind: KIND_EXIT, flags: 0 };
        assert_eq!(decode(&encode(&r)), r);
        assert_eq!(encode(&r)[0], 0x08, "little-endian");
    }

    #[test]
    fn checksum_sees_any_word_change() {
        let a = encode(&RawRecord { ts: 5, func: 1, depth: 0, kind: KIND_ENTRY, flags: 0 });
        let mut b = a;
        b[3] ^= 0x10;
        assert_ne!(checksum_step(CHECKSUM_SEED, &a), checksum_step(CHECKSUM_SEED, &b));
        let mut c = a;
        c[15] ^= 1;
        assert_ne!(checksum_step(CHECKSUM_SEED, &a), checksum_step(CHECKSUM_SEED, &c));
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
