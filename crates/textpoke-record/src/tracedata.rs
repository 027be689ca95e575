//! Reading a trace directory written by the recorder ([`crate::start`]).
//!
//! # Validation
//!
//! [`Trace::open`] checks the whole directory before it returns, so that
//! what it hands out is either valid or an error — never partial garbage —
//! and checks cheap things first, so that a damaged trace is refused
//! quickly whatever its size:
//!
//! 1. the directory and `meta.json` exist and are a directory and a
//!    regular file (never a FIFO or a device: reading one could block
//!    forever); `meta.json` parses, names the format and a version this
//!    build reads (another version gets a message saying which);
//! 2. `complete` is true — otherwise [`TraceReadError::Incomplete`], unless
//!    [`OpenOptions::allow_incomplete`] asks to salvage (below);
//! 3. the metadata is consistent with itself: no thread listed twice, no
//!    file named twice, plain file names, totals that add up (and fit
//!    in 64 bits, as every sum a reader makes of them then does);
//! 4. `symbols.jsonl` parses (no id twice); `counts.json` parses and names
//!    only known ids;
//! 5. every thread file is a regular file of exactly the size the metadata
//!    says (header + `words` words) — checked for all threads before any
//!    is read;
//! 6. one pass over each file decodes every record ([`format::Decoder`]),
//!    checks that function ids are in the symbol file, that times never go
//!    backwards (a sync record may not set an earlier one either) nor
//!    beyond the trace's end, the entry/exit counts, and the checksum.
//!
//! Iterating ([`Trace::records`], [`Trace::merged`]) re-reads the files
//! and still returns errors, in case they changed since `open`. Its memory
//! is bounded whatever the trace: one chunk per thread (a fixed budget
//! shared by all threads when merging, with no file held open).
//!
//! # Gaps
//!
//! Where a thread's buffer could not grow and events were lost, the stream
//! holds a sync record with the number lost and the depth recording
//! resumed at; the reader hands it out as a [`RecordKind::Gap`] record, in
//! place, for the analyses to mark and resynchronise on.
//!
//! # Salvaging an incomplete trace
//!
//! With `allow_incomplete`, a trace whose `complete` is false (the process
//! crashed, was killed, or called `exec` before the final flush) opens with
//! [`Trace::is_complete`] false. Each thread keeps the whole records its
//! file holds up to the first invalid one (a file may hold more than the
//! metadata, written before the last metadata update, or less);
//! [`Trace::salvage_notes`] says what was cut.

use crate::format::{
    self, ClockInfo, CountsFile, Item, Meta, Mode, Symbol, ThreadMeta, KIND_ENTRY, THREAD_HEADER_LEN, WORD,
};
use crate::FuncId;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why a trace directory cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TraceReadError {
    #[error("trace directory {path} does not exist; record one first (textpoke record)")]
    NotFound { path: PathBuf },

    #[error("{path} is not a directory; give the trace directory")]
    NotADirectory { path: PathBuf },

    #[error("{path} is missing: {hint}")]
    MissingFile { path: PathBuf, hint: &'static str },

    #[error("{path} is not a regular file ({kind}); a trace holds only regular files")]
    NotAFile { path: PathBuf, kind: &'static str },

    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path} is not valid JSON of the expected shape: {source}")]
    Json { path: PathBuf, source: serde_json::Error },

    #[error("{path} is not a textpoke trace (format {found:?})")]
    NotATrace { path: PathBuf, found: String },

    #[error("{path}: trace format version {found}, this textpoke reads version {supported}; record the program again with this textpoke, or read the trace with the textpoke that wrote it")]
    UnsupportedVersion { path: PathBuf, found: u32, supported: u32 },

    #[error("trace {dir} is incomplete: the recording did not finish (the process crashed, was killed, or called exec before the final flush); open it with allow_incomplete (--salvage) to read what was written")]
    Incomplete { dir: PathBuf },

    #[error("{path}: bad header: {what}")]
    BadHeader { path: PathBuf, what: String },

    #[error("{path} is truncated: the metadata says {expected} words, the file holds {found}")]
    Truncated { path: PathBuf, expected: u64, found: u64 },

    #[error("{path} has {extra_bytes} byte(s) beyond the {expected} words the metadata says")]
    TrailingData { path: PathBuf, expected: u64, extra_bytes: u64 },

    #[error("{path}: word {index} is corrupt: {what}")]
    CorruptRecord { path: PathBuf, index: u64, what: String },

    #[error(
        "{path}: checksum {found:016x} does not match the metadata's {expected}; the file was modified or damaged"
    )]
    ChecksumMismatch { path: PathBuf, expected: String, found: u64 },

    #[error("trace {dir} is inconsistent: {what}")]
    Inconsistent { dir: PathBuf, what: String },
}

/// How to open a trace.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    /// Accept a trace whose `complete` is false and salvage it.
    pub allow_incomplete: bool,
}

/// What a record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// The function was entered.
    Entry,
    /// The function returned.
    Exit,
    /// `lost` events were lost here (the thread's buffer could not grow);
    /// the next event is at `depth`. `ts` is the time of the last event
    /// before the gap; `func` means nothing.
    Gap,
    /// `lost` events of calls a signal handler made while this thread was
    /// inside the tracer or the recorder were not recorded here (they are
    /// counted); the calls around them nest as recorded. `ts` is the time
    /// of the last event before; `func` and `depth` mean nothing.
    Cut,
}

/// One record of one thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// Entry, exit or gap.
    pub kind: RecordKind,
    /// The function ([`Trace::symbol`]).
    pub func: FuncId,
    /// The thread.
    pub tid: i32,
    /// Clock ticks; [`Trace::to_ns`] converts.
    pub ts: u64,
    /// Traced frames below the function on the thread's stack, as the
    /// tracer saw them (for a gap: the depth recording resumed at).
    pub depth: u32,
    /// The return value, for an exit recorded with one.
    pub value: Option<u64>,
    /// For a gap: how many events were lost.
    pub lost: u64,
}

/// One thread of a trace.
#[derive(Clone, Debug)]
pub struct ThreadTrace {
    /// What the metadata says.
    pub meta: ThreadMeta,
    /// Its event file.
    pub path: Option<PathBuf>,
    /// Words usable: the metadata's count, or in a salvaged trace the
    /// whole records found.
    pub words: u64,
}

impl ThreadTrace {
    /// The thread id.
    pub fn tid(&self) -> i32 {
        self.meta.tid
    }

    /// Events this thread lost (buffer limits, nesting).
    pub fn dropped(&self) -> u64 {
        self.meta.dropped()
    }
}

/// A validated trace directory.
#[derive(Clone, Debug)]
pub struct Trace {
    dir: PathBuf,
    meta: Meta,
    symbols: HashMap<u32, Symbol>,
    counts: Vec<(FuncId, u64)>,
    threads: Vec<ThreadTrace>,
    children: Vec<PathBuf>,
    salvage: Vec<String>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TraceReadError + '_ {
    move |source| TraceReadError::Io { path: path.to_path_buf(), source }
}

/// Opens `path` for reading if it is a regular file: without blocking (a
/// FIFO would block the open itself) and without following a symlink
/// planted in the directory.
fn open_regular(path: &Path, hint: &'static str) -> Result<(File, u64), TraceReadError> {
    let f =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW).open(path).map_err(
            |e| match e.kind() {
                std::io::ErrorKind::NotFound => TraceReadError::MissingFile { path: path.to_path_buf(), hint },
                _ if e.raw_os_error() == Some(libc::ELOOP) => {
                    TraceReadError::NotAFile { path: path.to_path_buf(), kind: "a symbolic link" }
                }
                _ => TraceReadError::Io { path: path.to_path_buf(), source: e },
            },
        )?;
    let m = f.metadata().map_err(io(path))?;
    if !m.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let t = m.file_type();
        let kind = if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_char_device() || t.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(TraceReadError::NotAFile { path: path.to_path_buf(), kind });
    }
    Ok((f, m.len()))
}

/// The most a JSON side file may hold: far more than any real trace's
/// (a million threads' metadata), far less than memory.
const MAX_JSON_BYTES: u64 = 1 << 30;

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, hint: &'static str) -> Result<T, TraceReadError> {
    let (f, len) = open_regular(path, hint)?;
    if len > MAX_JSON_BYTES {
        let what = format!("{} is {len} bytes, more than any trace's metadata", path.display());
        return Err(TraceReadError::Inconsistent { dir: path.parent().unwrap_or(path).to_path_buf(), what });
    }
    let r = BufReader::with_capacity(1 << 16, f);
    serde_json::from_reader(r).map_err(|source| TraceReadError::Json { path: path.to_path_buf(), source })
}

/// The first fields of `meta.json`, read before the rest so that another
/// version is reported as such rather than as a shape mismatch.
#[derive(serde::Deserialize)]
struct Head {
    format: String,
    version: u32,
}

/// Reads the symbol file: one JSON object per line.
fn read_symbols(path: &Path, hint: &'static str) -> Result<HashMap<u32, Symbol>, TraceReadError> {
    let (f, _) = open_regular(path, hint)?;
    let mut out = HashMap::new();
    for (i, line) in BufReader::with_capacity(1 << 16, f).lines().enumerate() {
        let line = line.map_err(io(path))?;
        if line.is_empty() {
            continue;
        }
        let s: Symbol =
            serde_json::from_str(&line).map_err(|source| TraceReadError::Json { path: path.to_path_buf(), source })?;
        if out.contains_key(&s.id) {
            return Err(TraceReadError::CorruptRecord {
                path: path.to_path_buf(),
                index: i as u64,
                what: format!("function id {} appears twice", s.id),
            });
        }
        out.insert(s.id, s);
    }
    Ok(out)
}

impl Trace {
    /// Opens and validates a complete trace directory.
    pub fn open(dir: impl AsRef<Path>) -> Result<Trace, TraceReadError> {
        Self::open_with(dir, OpenOptions::default())
    }

    /// Opens a trace directory with options.
    pub fn open_with(dir: impl AsRef<Path>, opts: OpenOptions) -> Result<Trace, TraceReadError> {
        let dir = dir.as_ref().to_path_buf();
        match std::fs::metadata(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(TraceReadError::NotFound { path: dir }),
            Err(e) => return Err(TraceReadError::Io { path: dir, source: e }),
            Ok(m) if !m.is_dir() => return Err(TraceReadError::NotADirectory { path: dir }),
            Ok(_) => {}
        }
        let meta = read_meta(&dir)?;
        if !meta.complete && !opts.allow_incomplete {
            return Err(TraceReadError::Incomplete { dir });
        }
        let mut salvage = Vec::new();
        check_meta(&dir, &meta)?;
        let sym_path = dir.join(format::SYMBOLS_FILE);
        let symbols = match read_symbols(&sym_path, "the trace has no symbol file") {
            Ok(s) => s,
            Err(TraceReadError::MissingFile { .. }) if !meta.complete => {
                salvage.push("symbols.jsonl was not written yet: functions are shown by id".to_string());
                HashMap::new()
            }
            Err(e) => return Err(e),
        };
        let counts = read_counts(&dir, &meta, &symbols, &mut salvage)?;
        // 5 for every thread, then 6.
        let mut sized = Vec::with_capacity(meta.threads.len());
        for t in &meta.threads {
            sized.push(size_thread_file(&dir, t, meta.complete, &mut salvage)?);
        }
        let known = |f: u32| symbols.contains_key(&f) || !meta.complete && symbols.is_empty();
        let bounds = time_bounds(&meta);
        let mut threads = Vec::with_capacity(meta.threads.len());
        for (t, (path, words)) in meta.threads.iter().zip(sized) {
            let words = match &path {
                Some(p) => check_thread_file(p, t, words, (meta.complete, bounds), &known, &mut salvage)?,
                None => 0,
            };
            threads.push(ThreadTrace { meta: t.clone(), path, words });
        }
        let children = child_dirs(&dir);
        Ok(Trace { dir, meta, symbols, counts, threads, children, salvage })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The metadata.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Whether the final flush completed.
    pub fn is_complete(&self) -> bool {
        self.meta.complete
    }

    /// Record or count-only.
    pub fn mode(&self) -> Mode {
        self.meta.mode
    }

    /// What salvaging an incomplete trace had to cut (empty otherwise).
    pub fn salvage_notes(&self) -> &[String] {
        &self.salvage
    }

    /// The functions that appear in the trace, in id order.
    pub fn symbols(&self) -> Vec<&Symbol> {
        let mut v: Vec<&Symbol> = self.symbols.values().collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// A function's symbol.
    pub fn symbol(&self, f: FuncId) -> Option<&Symbol> {
        self.symbols.get(&f.0)
    }

    /// A function's name (`"?"` if unknown).
    pub fn name(&self, f: FuncId) -> &str {
        self.symbol(f).map_or("?", |s| s.name.as_str())
    }

    /// The threads, sorted by tid.
    pub fn threads(&self) -> &[ThreadTrace] {
        &self.threads
    }

    /// Exact calls per function, summed over threads (also when events
    /// were lost), in id order.
    pub fn counts(&self) -> &[(FuncId, u64)] {
        &self.counts
    }

    /// Events lost, all causes.
    pub fn dropped(&self) -> u64 {
        self.meta.total_dropped
    }

    /// Trace directories of forked children (`child-<pid>`), to open with
    /// [`Trace::open`].
    pub fn children(&self) -> &[PathBuf] {
        &self.children
    }

    /// The clock conversion.
    pub fn clock(&self) -> &ClockInfo {
        &self.meta.clock
    }

    /// `CLOCK_MONOTONIC` nanoseconds of a timestamp.
    pub fn to_ns(&self, ts: u64) -> u64 {
        self.meta.clock.to_ns(ts)
    }

    /// Nanoseconds between two timestamps.
    pub fn delta_ns(&self, earlier: u64, later: u64) -> u64 {
        self.meta.clock.delta_ns(earlier, later)
    }

    /// One thread's records in time order (its program order).
    pub fn records(&self, thread: &ThreadTrace) -> Result<ThreadRecords, TraceReadError> {
        ThreadRecords::open(thread, CHUNK_WORDS, false)
    }

    /// Every thread's records merged in time order (ties: by tid). Holds
    /// no file open and at most 4 MiB of read buffers, however many
    /// threads there are (see [`ThreadRecords`]); reading thread by thread
    /// ([`Trace::records`]) is faster.
    pub fn merged(&self) -> Result<Merged, TraceReadError> {
        let mut iters = Vec::new();
        let mut heap = BinaryHeap::new();
        let chunk = (MERGE_BUFFER_BYTES / WORD / self.threads.len().max(1)).clamp(MERGE_MIN_CHUNK_WORDS, CHUNK_WORDS);
        for t in &self.threads {
            let mut it = ThreadRecords::open(t, chunk, true)?;
            if let Some(r) = it.next() {
                let r = r?;
                heap.push(std::cmp::Reverse((r.ts, r.tid, iters.len())));
                iters.push((it, Some(r)));
            }
        }
        Ok(Merged { iters, heap, failed: false })
    }
}

/// Step 1: `meta.json`, its format and version.
fn read_meta(dir: &Path) -> Result<Meta, TraceReadError> {
    let meta_path = dir.join(format::META_FILE);
    let hint = "not a textpoke trace directory, or the recording never wrote anything";
    let head: Head = read_json(&meta_path, hint)?;
    if head.format != format::FORMAT_NAME {
        return Err(TraceReadError::NotATrace { path: meta_path, found: head.format });
    }
    if head.version != format::FORMAT_VERSION {
        return Err(TraceReadError::UnsupportedVersion {
            path: meta_path,
            found: head.version,
            supported: format::FORMAT_VERSION,
        });
    }
    read_json(&meta_path, hint)
}

/// Step 3: the metadata against itself.
fn check_meta(dir: &Path, meta: &Meta) -> Result<(), TraceReadError> {
    let inconsistent = |what: String| TraceReadError::Inconsistent { dir: dir.to_path_buf(), what };
    if meta.clock.shift > 64 || meta.clock.mult == 0 {
        return Err(inconsistent(format!("clock conversion mult={} shift={}", meta.clock.mult, meta.clock.shift)));
    }
    let mut files = HashSet::new();
    let mut live_tids = HashSet::new();
    for t in &meta.threads {
        if !t.exited && !live_tids.insert(t.tid) {
            return Err(inconsistent(format!("thread {} is listed twice as running", t.tid)));
        }
        match &t.file {
            Some(name) => {
                if name.is_empty() || name.contains('/') || name.starts_with('.') {
                    return Err(inconsistent(format!("thread {}: file name {name:?} is not a plain file name", t.tid)));
                }
                if !files.insert(name.as_str()) {
                    return Err(inconsistent(format!("file {name} is listed for two threads")));
                }
            }
            None if t.words != 0 || t.entries != 0 || t.exits != 0 => {
                return Err(inconsistent(format!("thread {} has {} words but no file", t.tid, t.words)));
            }
            None => {}
        }
    }
    // The sums below, and those readers make later (a thread's events and
    // drops, the totals), must fit in 64 bits: a count past that is damage.
    let overflow = |what: &str| inconsistent(format!("{what} add up to more than 2^64"));
    let mut dropped = Some(0u64);
    let mut events = Some(0u64);
    let mut calls = Some(0u64);
    for t in &meta.threads {
        let (Some(e), Some(d)) = (t.entries.checked_add(t.exits), t.lost.checked_add(t.dropped_nested)) else {
            return Err(overflow(&format!("thread {}: its event or drop counts", t.tid)));
        };
        events = events.and_then(|n| n.checked_add(e));
        dropped = dropped.and_then(|n| n.checked_add(d));
        calls = calls.and_then(|n| n.checked_add(t.calls));
    }
    let u = &meta.unattributed_drops;
    let dropped = [u.creating, u.exiting, u.no_memory, u.writer_thread, u.io, u.in_flight_at_stop]
        .into_iter()
        .try_fold(dropped.ok_or_else(|| overflow("the threads' drop counts"))?, u64::checked_add)
        .ok_or_else(|| overflow("the drop counts"))?;
    let events = events.ok_or_else(|| overflow("the threads' event counts"))?;
    let calls = calls
        .and_then(|n| n.checked_add(meta.unattributed_calls))
        .ok_or_else(|| overflow("the threads' and unattributed call counts"))?;
    if dropped != meta.total_dropped {
        return Err(inconsistent(format!(
            "total_dropped is {} but the drop counts add up to {dropped}",
            meta.total_dropped
        )));
    }
    if meta.complete {
        if events != meta.total_events {
            return Err(inconsistent(format!(
                "total_events is {} but the threads add up to {events}",
                meta.total_events
            )));
        }
        if calls != meta.total_calls {
            return Err(inconsistent(format!(
                "total_calls is {} but the threads and unattributed_calls add up to {calls}",
                meta.total_calls
            )));
        }
    }
    Ok(())
}

/// Step 4 for `counts.json`.
fn read_counts(
    dir: &Path,
    meta: &Meta,
    symbols: &HashMap<u32, Symbol>,
    salvage: &mut Vec<String>,
) -> Result<Vec<(FuncId, u64)>, TraceReadError> {
    let path = dir.join(format::COUNTS_FILE);
    match read_json::<CountsFile>(&path, "a trace must have its call counts") {
        Ok(c) => {
            let mut prev = None;
            for (i, &(id, _)) in c.calls.iter().enumerate() {
                if !symbols.contains_key(&id) && (!symbols.is_empty() || meta.complete) {
                    return Err(TraceReadError::CorruptRecord {
                        path,
                        index: i as u64,
                        what: format!("function id {id} is not in the symbol file"),
                    });
                }
                if prev.is_some_and(|p| p >= id) {
                    return Err(TraceReadError::CorruptRecord {
                        path,
                        index: i as u64,
                        what: format!("function id {id} out of order or twice"),
                    });
                }
                prev = Some(id);
            }
            Ok(c.calls.into_iter().map(|(id, n)| (FuncId(id), n)).collect())
        }
        Err(TraceReadError::MissingFile { .. }) if !meta.complete => {
            salvage.push("counts.json was not written yet: no exact call counts".to_string());
            Ok(Vec::new())
        }
        Err(e) => Err(e),
    }
}

/// The earliest and latest time an event may have, with a margin for the
/// clock's reordering across threads; `None` for an incomplete trace (no
/// end time).
fn time_bounds(meta: &Meta) -> Option<(u64, u64)> {
    let end = meta.end_ts?;
    // A millisecond at any clock rate up to 10 GHz.
    let slack = 10_000_000;
    Some((meta.start_ts.saturating_sub(slack), end.saturating_add(slack)))
}

/// Step 5 for one thread: the file exists, is regular, and its size
/// matches. Returns its path and the words to read.
fn size_thread_file(
    dir: &Path,
    t: &ThreadMeta,
    complete: bool,
    salvage: &mut Vec<String>,
) -> Result<(Option<PathBuf>, u64), TraceReadError> {
    let Some(name) = &t.file else { return Ok((None, 0)) };
    let path = dir.join(name);
    let (_, len) = open_regular(&path, "the metadata lists this thread's event file")?;
    if len < THREAD_HEADER_LEN as u64 {
        let what = format!("the file has {len} bytes, shorter than the {THREAD_HEADER_LEN}-byte header");
        return Err(TraceReadError::BadHeader { path, what });
    }
    let body = len - THREAD_HEADER_LEN as u64;
    let (whole, partial) = (body / WORD as u64, body % WORD as u64);
    if complete {
        if whole < t.words {
            return Err(TraceReadError::Truncated { path, expected: t.words, found: whole });
        }
        if body > t.words * WORD as u64 {
            return Err(TraceReadError::TrailingData {
                path,
                expected: t.words,
                extra_bytes: body - t.words * WORD as u64,
            });
        }
        return Ok((Some(path), t.words));
    }
    if partial != 0 {
        salvage.push(format!("{}: ignored a partial word of {partial} byte(s) at the end", path.display()));
    }
    Ok((Some(path), whole))
}

/// Step 6 for one file; returns the usable word count.
fn check_thread_file(
    path: &Path,
    t: &ThreadMeta,
    words: u64,
    (complete, bounds): (bool, Option<(u64, u64)>),
    known: &dyn Fn(u32) -> bool,
    salvage: &mut Vec<String>,
) -> Result<u64, TraceReadError> {
    let (f, _) = open_regular(path, "the metadata lists this thread's event file")?;
    let mut r = BufReader::with_capacity(1 << 16, f);
    check_header(&mut r, path, t.tid)?;
    let mut dec = format::Decoder::new();
    let mut h = format::CHECKSUM_SEED;
    let (mut entries, mut exits) = (0u64, 0u64);
    let mut problem: Option<String> = None;
    let mut good = 0u64; // words up to the end of the last whole, valid record
    let mut buf = vec![0u64; 8192];
    let mut read = 0u64;
    let mut last_ts = 0u64;
    while read < words && problem.is_none() {
        let n = (words - read).min(buf.len() as u64) as usize;
        read_words(&mut r, &mut buf[..n]).map_err(io(path))?;
        for &w in &buf[..n] {
            if complete || read < t.words {
                h = format::checksum_step(h, w);
            }
            read += 1;
            if !complete && read == t.words {
                check_sum(path, t, h)?;
            }
            let mut sink = |item: Item| {
                if let Item::Event(e) = item {
                    if problem.is_none() {
                        problem = check_event(&e, bounds, known).err();
                    }
                    if problem.is_none() && e.ts < last_ts {
                        // A sync record can set any time; the recorder's
                        // never go back (H5 clamps every event's).
                        problem = Some(format!("time goes backwards, from {last_ts} to {}", e.ts));
                    }
                    last_ts = e.ts;
                    entries += (e.kind == KIND_ENTRY) as u64;
                    exits += (e.kind != KIND_ENTRY) as u64;
                }
            };
            if let Err(e) = dec.feed(&[w], &mut sink) {
                problem = Some(e.what);
            }
            if problem.is_some() {
                break;
            }
            if !dec.in_record() {
                good = read;
            }
        }
    }
    if let Some(what) = problem {
        if complete || read <= t.words {
            return Err(TraceReadError::CorruptRecord {
                path: path.to_path_buf(),
                index: read.saturating_sub(1),
                what,
            });
        }
        salvage.push(format!("{}: cut at word {} of {words}: {what}", path.display(), read - 1));
        return Ok(good);
    }
    if complete {
        check_sum(path, t, h)?;
        if entries != t.entries || exits != t.exits {
            return Err(TraceReadError::CorruptRecord {
                path: path.to_path_buf(),
                index: words,
                what: format!("{entries} entries and {exits} exits, the metadata says {} and {}", t.entries, t.exits),
            });
        }
        return Ok(words);
    }
    if words < t.words {
        salvage.push(format!("{}: the metadata says {} words, the file holds {words}", path.display(), t.words));
    }
    if good < words {
        salvage.push(format!("{}: ignored a record cut off at the end", path.display()));
    }
    Ok(good)
}

/// Reads whole little-endian words.
fn read_words(r: &mut impl Read, out: &mut [u64]) -> std::io::Result<()> {
    // SAFETY: u64 has no invalid bit patterns; the slice is ours.
    let bytes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, std::mem::size_of_val(out)) };
    r.read_exact(bytes)?;
    for w in out.iter_mut() {
        *w = u64::from_le(*w);
    }
    Ok(())
}

fn check_event(e: &format::Event, bounds: Option<(u64, u64)>, known: &dyn Fn(u32) -> bool) -> Result<(), String> {
    if !known(e.func) {
        return Err(format!("function id {} is not in the symbol file", e.func));
    }
    if let Some((lo, hi)) = bounds {
        if e.ts < lo || e.ts > hi {
            return Err(format!("time {} lies outside the recording ({lo}..{hi})", e.ts));
        }
    }
    if e.depth as usize > textpoke::trace::MAX_DEPTH {
        return Err(format!("depth {} is deeper than any shadow stack", e.depth));
    }
    Ok(())
}

fn check_sum(path: &Path, t: &ThreadMeta, h: u64) -> Result<(), TraceReadError> {
    if format!("{h:016x}") != t.checksum {
        return Err(TraceReadError::ChecksumMismatch {
            path: path.to_path_buf(),
            expected: t.checksum.clone(),
            found: h,
        });
    }
    Ok(())
}

fn check_header(r: &mut impl Read, path: &Path, tid: i32) -> Result<(), TraceReadError> {
    let bad = |what: String| TraceReadError::BadHeader { path: path.to_path_buf(), what };
    let mut h = [0u8; THREAD_HEADER_LEN];
    r.read_exact(&mut h).map_err(io(path))?;
    let file_tid = format::parse_thread_header(&h).map_err(bad)?;
    if file_tid != tid {
        return Err(bad(format!("thread id {file_tid}, the metadata says {tid}")));
    }
    Ok(())
}

fn child_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut children = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if name.starts_with(format::CHILD_DIR_PREFIX) && is_dir {
                children.push(e.path());
            }
        }
    }
    children.sort();
    children
}

/// Words a thread's iterator reads at a time when it is read alone.
const CHUNK_WORDS: usize = 8192;
/// The most memory the read buffers of a [`Merged`] stream take, all
/// threads together.
const MERGE_BUFFER_BYTES: usize = 4 << 20;
/// The fewest words a thread's iterator in a [`Merged`] stream reads at
/// a time.
const MERGE_MIN_CHUNK_WORDS: usize = 64;

const EVENT_FILE_HINT: &str = "the metadata lists this thread's event file";

/// One thread's records, in order. Yields errors if the file changed
/// since [`Trace::open`] validated it.
///
/// It reads a chunk of words at a time at its place in the file and
/// decodes them one by one, so that it holds one chunk and a record.
/// Read alone ([`Trace::records`]), it keeps its file open and reads
/// 64 KiB chunks; in a [`Merged`] stream, which holds one per thread, it
/// opens the file again for each chunk and its chunks share a fixed
/// budget, so that merging ten thousand threads needs neither ten
/// thousand descriptors nor ten thousand big buffers.
pub struct ThreadRecords {
    /// The open file, unless it is opened for each chunk.
    file: Option<File>,
    path: PathBuf,
    tid: i32,
    /// Byte offset of the next chunk.
    offset: u64,
    /// Words not yet read.
    left: u64,
    dec: format::Decoder,
    /// Decoded and not yet handed out.
    queue: std::collections::VecDeque<Record>,
    /// The current chunk and the next word of it to decode.
    buf: Vec<u64>,
    pos: usize,
    chunk: usize,
    /// Time of the last event (where a lost or cut mark is placed).
    last: u64,
}

impl ThreadRecords {
    /// An iterator reading `chunk` words at a time, keeping its file open
    /// unless `reopen`.
    fn open(t: &ThreadTrace, chunk: usize, reopen: bool) -> Result<ThreadRecords, TraceReadError> {
        let mut it = ThreadRecords {
            file: None,
            path: t.path.clone().unwrap_or_default(),
            tid: t.meta.tid,
            offset: THREAD_HEADER_LEN as u64,
            left: 0,
            dec: format::Decoder::new(),
            queue: Default::default(),
            buf: Vec::new(),
            pos: 0,
            chunk,
            last: 0,
        };
        let Some(path) = &t.path else { return Ok(it) };
        if !reopen {
            it.file = Some(open_regular(path, EVENT_FILE_HINT)?.0);
        }
        it.left = t.words;
        Ok(it)
    }

    /// Reads the next chunk.
    fn refill(&mut self) -> Result<(), TraceReadError> {
        use std::os::unix::fs::FileExt;
        let n = self.left.min(self.chunk as u64) as usize;
        self.buf.resize(n, 0);
        let opened;
        let f = match &self.file {
            Some(f) => f,
            None => {
                opened = open_regular(&self.path, EVENT_FILE_HINT)?.0;
                &opened
            }
        };
        // SAFETY: u64 has no invalid bit patterns; the slice is ours.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_ptr() as *mut u8, n * WORD) };
        f.read_exact_at(bytes, self.offset).map_err(io(&self.path))?;
        for w in self.buf.iter_mut() {
            *w = u64::from_le(*w);
        }
        self.offset += (n * WORD) as u64;
        self.left -= n as u64;
        self.pos = 0;
        Ok(())
    }

    /// Decodes one word into the queue.
    fn decode(&mut self, w: u64) -> Result<(), TraceReadError> {
        let (tid, queue, last) = (self.tid, &mut self.queue, &mut self.last);
        let mut sink = |item: Item| match item {
            Item::Event(e) => {
                *last = e.ts;
                queue.push_back(Record {
                    kind: if e.kind == KIND_ENTRY { RecordKind::Entry } else { RecordKind::Exit },
                    func: FuncId(e.func),
                    tid,
                    ts: e.ts,
                    depth: e.depth,
                    value: e.value,
                    lost: 0,
                })
            }
            Item::Sync { depth, lost, base_ts, .. } if lost > 0 => queue.push_back(Record {
                kind: RecordKind::Gap,
                func: FuncId(0),
                tid,
                ts: base_ts,
                depth,
                value: None,
                lost,
            }),
            Item::Lost { count } => queue.push_back(Record {
                kind: RecordKind::Gap,
                func: FuncId(0),
                tid,
                ts: *last,
                depth: u32::MAX,
                value: None,
                lost: count,
            }),
            Item::Cut { count } => queue.push_back(Record {
                kind: RecordKind::Cut,
                func: FuncId(0),
                tid,
                ts: *last,
                depth: 0,
                value: None,
                lost: count,
            }),
            Item::Sync { .. } => {}
        };
        self.dec.feed(&[w], &mut sink).map_err(|e| TraceReadError::CorruptRecord {
            path: self.path.clone(),
            index: e.word,
            what: format!("{} (file changed since open?)", e.what),
        })
    }
}

impl Iterator for ThreadRecords {
    type Item = Result<Record, TraceReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(r) = self.queue.pop_front() {
                return Some(Ok(r));
            }
            if self.pos == self.buf.len() {
                if self.left == 0 {
                    return None;
                }
                if let Err(e) = self.refill() {
                    self.left = 0;
                    self.buf.clear();
                    self.pos = 0;
                    return Some(Err(e));
                }
            }
            let w = self.buf[self.pos];
            self.pos += 1;
            if let Err(e) = self.decode(w) {
                (self.left, self.pos) = (0, self.buf.len());
                return Some(Err(e));
            }
        }
    }
}

/// Every thread's records merged by timestamp.
pub struct Merged {
    iters: Vec<(ThreadRecords, Option<Record>)>,
    heap: BinaryHeap<std::cmp::Reverse<(u64, i32, usize)>>,
    failed: bool,
}

impl Iterator for Merged {
    type Item = Result<Record, TraceReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let std::cmp::Reverse((_, _, i)) = self.heap.pop()?;
        let (it, cur) = &mut self.iters[i];
        let out = cur.take()?;
        match it.next() {
            Some(Ok(r)) => {
                self.heap.push(std::cmp::Reverse((r.ts, r.tid, i)));
                *cur = Some(r);
            }
            Some(Err(e)) => {
                self.failed = true;
                return Some(Err(e));
            }
            None => {}
        }
        Some(Ok(out))
    }
}
