//! Reading a trace directory written by [`crate::record`].
//!
//! # Validation
//!
//! [`Trace::open`] checks the whole directory before it returns, so that
//! what it hands out is either valid or an error — never partial garbage:
//!
//! 1. the directory and `meta.json` exist; `meta.json` parses, names the
//!    format and a version this build reads;
//! 2. `complete` is true — otherwise [`TraceError::Incomplete`], unless
//!    [`OpenOptions::allow_incomplete`] asks to salvage (below);
//! 3. `symbols.json` parses and its ids are dense from 0; in count mode
//!    `counts.json` parses and names only known ids;
//! 4. every thread file exists, has the right header (magic, version,
//!    record length, tid), holds exactly the number of records the
//!    metadata says (fewer: truncated; more or a partial record: trailing
//!    data), and one pass over its records checks each kind, that a value
//!    record follows an exit, that function ids are known, that
//!    timestamps never go backwards, the entry/exit counts, and the
//!    checksum.
//!
//! Iterating ([`Trace::records`], [`Trace::merged`]) re-reads the files
//! and still returns errors, in case they changed since `open`.
//!
//! # Salvaging an incomplete trace
//!
//! With `allow_incomplete`, a trace whose `complete` is false (the process
//! crashed, was killed, or called `exec` before the final flush) opens with
//! [`Trace::is_complete`] false. Each thread keeps the whole records its
//! file holds up to the first invalid one; the prefix the metadata vouches
//! for must still match its checksum. [`Trace::salvage_notes`] says what
//! was cut.

use crate::record::format::{
    self, ClockInfo, CountsFile, Meta, Mode, RawRecord, Symbol, SymbolsFile, ThreadMeta, KIND_ENTRY, KIND_EXIT,
    KIND_VALUE, RECORD_LEN, THREAD_HEADER_LEN,
};
use crate::record::FuncId;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// Why a trace directory cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TraceError {
    #[error("trace directory {path} does not exist; record one first (textpoke record)")]
    NotFound { path: PathBuf },

    #[error("{path} is not a directory; give the trace directory")]
    NotADirectory { path: PathBuf },

    #[error("{path} is missing: {hint}")]
    MissingFile { path: PathBuf, hint: &'static str },

    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path} is not valid JSON of the expected shape: {source}")]
    Json { path: PathBuf, source: serde_json::Error },

    #[error("{path} is not a textpoke trace (format {found:?})")]
    NotATrace { path: PathBuf, found: String },

    #[error("{path}: trace format version {found}, this textpoke reads version {supported}")]
    UnsupportedVersion { path: PathBuf, found: u32, supported: u32 },

    #[error("trace {dir} is incomplete: the recording did not finish (the process crashed, was killed, or called exec before the final flush); open it with allow_incomplete to read what was written")]
    Incomplete { dir: PathBuf },

    #[error("{path}: bad header: {what}")]
    BadHeader { path: PathBuf, what: String },

    #[error("{path} is truncated: the metadata says {expected} records, the file holds {found}")]
    Truncated { path: PathBuf, expected: u64, found: u64 },

    #[error("{path} has {extra_bytes} byte(s) beyond the {expected} records the metadata says")]
    TrailingData { path: PathBuf, expected: u64, extra_bytes: u64 },

    #[error("{path}: record {index} is corrupt: {what}")]
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

/// Entry or exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// The function was entered.
    Entry,
    /// The function returned.
    Exit,
}

/// One event of one thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// Entry or exit.
    pub kind: RecordKind,
    /// The function ([`Trace::symbol`]).
    pub func: FuncId,
    /// The thread.
    pub tid: i32,
    /// Clock ticks; [`Trace::to_ns`] converts.
    pub ts: u64,
    /// Call depth as recorded.
    pub depth: u16,
    /// The return value, for an exit recorded with one.
    pub value: Option<u64>,
}

/// One thread of a trace.
#[derive(Clone, Debug)]
pub struct ThreadTrace {
    /// What the metadata says.
    pub meta: ThreadMeta,
    /// Its record file.
    pub path: Option<PathBuf>,
    /// Records (16-byte slots) usable: the metadata's count, or in a
    /// salvaged trace the valid whole records found.
    pub records: u64,
}

impl ThreadTrace {
    /// The thread id.
    pub fn tid(&self) -> i32 {
        self.meta.tid
    }

    /// Records this thread dropped (full buffer, nested, out of range).
    pub fn dropped(&self) -> u64 {
        self.meta.dropped()
    }
}

/// A validated trace directory.
#[derive(Clone, Debug)]
pub struct Trace {
    dir: PathBuf,
    meta: Meta,
    symbols: Vec<Symbol>,
    counts: Option<Vec<(FuncId, u64)>>,
    threads: Vec<ThreadTrace>,
    children: Vec<PathBuf>,
    salvage: Vec<String>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TraceError + '_ {
    move |source| TraceError::Io { path: path.to_path_buf(), source }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, hint: &'static str) -> Result<T, TraceError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(TraceError::MissingFile { path: path.to_path_buf(), hint })
        }
        Err(e) => return Err(TraceError::Io { path: path.to_path_buf(), source: e }),
    };
    serde_json::from_slice(&bytes).map_err(|source| TraceError::Json { path: path.to_path_buf(), source })
}

/// The first fields of `meta.json`, read before the rest so that another
/// version is reported as such rather than as a shape mismatch.
#[derive(serde::Deserialize)]
struct Head {
    format: String,
    version: u32,
}

impl Trace {
    /// Opens and validates a complete trace directory.
    pub fn open(dir: impl AsRef<Path>) -> Result<Trace, TraceError> {
        Self::open_with(dir, OpenOptions::default())
    }

    /// Opens a trace directory with options.
    pub fn open_with(dir: impl AsRef<Path>, opts: OpenOptions) -> Result<Trace, TraceError> {
        let dir = dir.as_ref().to_path_buf();
        match std::fs::metadata(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(TraceError::NotFound { path: dir }),
            Err(e) => return Err(TraceError::Io { path: dir, source: e }),
            Ok(m) if !m.is_dir() => return Err(TraceError::NotADirectory { path: dir }),
            Ok(_) => {}
        }
        // 1.
        let meta_path = dir.join(format::META_FILE);
        let head: Head =
            read_json(&meta_path, "not a textpoke trace directory, or the recording never wrote anything")?;
        if head.format != format::FORMAT_NAME {
            return Err(TraceError::NotATrace { path: meta_path, found: head.format });
        }
        if head.version != format::FORMAT_VERSION {
            return Err(TraceError::UnsupportedVersion {
                path: meta_path,
                found: head.version,
                supported: format::FORMAT_VERSION,
            });
        }
        let meta: Meta = read_json(&meta_path, "")?;
        // 2.
        if !meta.complete && !opts.allow_incomplete {
            return Err(TraceError::Incomplete { dir });
        }
        let mut salvage = Vec::new();
        let inconsistent = |what: String| TraceError::Inconsistent { dir: dir.clone(), what };
        if meta.clock.shift > 64 || meta.clock.mult == 0 {
            return Err(inconsistent(format!("clock conversion mult={} shift={}", meta.clock.mult, meta.clock.shift)));
        }
        // 3.
        let sym_path = dir.join(format::SYMBOLS_FILE);
        let symbols = match read_json::<SymbolsFile>(&sym_path, "the trace has no symbol table") {
            Ok(s) => s.symbols,
            Err(TraceError::MissingFile { .. }) if !meta.complete && meta.threads.is_empty() => Vec::new(),
            Err(e) => return Err(e),
        };
        if let Some((i, s)) = symbols.iter().enumerate().find(|(i, s)| s.id as usize != *i) {
            return Err(TraceError::CorruptRecord {
                path: sym_path,
                index: i as u64,
                what: format!("symbol id {} at position {i}; ids must be dense from 0", s.id),
            });
        }
        let nsyms = symbols.len() as u64;
        let counts = if meta.mode == Mode::Count {
            let path = dir.join(format::COUNTS_FILE);
            match read_json::<CountsFile>(&path, "a count-only trace must have call counts") {
                Ok(c) => {
                    if let Some(&(id, _)) = c.calls.iter().find(|(id, _)| *id as u64 >= nsyms) {
                        return Err(TraceError::CorruptRecord {
                            path,
                            index: id as u64,
                            what: format!("function id {id} is not in the symbol table ({nsyms} symbols)"),
                        });
                    }
                    Some(c.calls.into_iter().map(|(id, n)| (FuncId(id), n)).collect())
                }
                Err(TraceError::MissingFile { .. }) if !meta.complete => {
                    salvage.push("counts.json was not written yet: no counts".to_string());
                    Some(Vec::new())
                }
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        // 4.
        let mut threads = Vec::with_capacity(meta.threads.len());
        for t in &meta.threads {
            let Some(name) = &t.file else {
                if t.records != 0 {
                    return Err(inconsistent(format!("thread {} has {} records but no file", t.tid, t.records)));
                }
                threads.push(ThreadTrace { meta: t.clone(), path: None, records: 0 });
                continue;
            };
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                return Err(inconsistent(format!("thread {}: file name {name:?} is not a plain file name", t.tid)));
            }
            let path = dir.join(name);
            let records = check_thread_file(&path, t, nsyms, meta.complete, &mut salvage)?;
            threads.push(ThreadTrace { meta: t.clone(), path: Some(path), records });
        }
        let dropped: u64 = meta.threads.iter().map(|t| t.dropped()).sum::<u64>() + meta.unattributed_drops.total();
        if dropped != meta.total_dropped {
            return Err(inconsistent(format!(
                "total_dropped is {} but the drop counts add up to {dropped}",
                meta.total_dropped
            )));
        }
        if meta.complete {
            let sum: u64 = meta.threads.iter().map(|t| t.records).sum();
            if sum != meta.total_records {
                return Err(inconsistent(format!(
                    "total_records is {} but the threads add up to {sum}",
                    meta.total_records
                )));
            }
        }
        let mut children = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(format::CHILD_DIR_PREFIX) && e.path().is_dir() {
                    children.push(e.path());
                }
            }
        }
        children.sort();
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

    /// The symbol table, indexed by function id.
    pub fn symbols(&self) -> &[Symbol] {
        &self.symbols
    }

    /// A function's symbol.
    pub fn symbol(&self, f: FuncId) -> Option<&Symbol> {
        self.symbols.get(f.0 as usize)
    }

    /// A function's name (`"?"` if unknown).
    pub fn name(&self, f: FuncId) -> &str {
        self.symbol(f).map_or("?", |s| s.name.as_str())
    }

    /// The threads, sorted by tid.
    pub fn threads(&self) -> &[ThreadTrace] {
        &self.threads
    }

    /// Count-only traces: calls per function (summed over threads).
    pub fn counts(&self) -> Option<&[(FuncId, u64)]> {
        self.counts.as_deref()
    }

    /// Records dropped, all causes.
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
    pub fn records(&self, thread: &ThreadTrace) -> Result<ThreadRecords, TraceError> {
        ThreadRecords::open(thread)
    }

    /// Every thread's records merged in time order (ties: by tid).
    pub fn merged(&self) -> Result<Merged, TraceError> {
        let mut iters = Vec::new();
        let mut heap = BinaryHeap::new();
        for t in &self.threads {
            let mut it = ThreadRecords::open(t)?;
            if let Some(r) = it.next() {
                let r = r?;
                heap.push(std::cmp::Reverse((r.ts, r.tid, iters.len())));
                iters.push((it, Some(r)));
            }
        }
        Ok(Merged { iters, heap, failed: false })
    }
}

/// Step 4 for one file; returns the usable record count.
fn check_thread_file(
    path: &Path,
    t: &ThreadMeta,
    nsyms: u64,
    complete: bool,
    salvage: &mut Vec<String>,
) -> Result<u64, TraceError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(TraceError::MissingFile {
                path: path.to_path_buf(),
                hint: "the metadata lists this thread's record file",
            })
        }
        Err(e) => return Err(TraceError::Io { path: path.to_path_buf(), source: e }),
    };
    let len = f.metadata().map_err(io(path))?.len();
    let mut r = BufReader::with_capacity(1 << 16, f);
    check_header(&mut r, path, t.tid, len)?;
    let body = len - THREAD_HEADER_LEN as u64;
    let whole = body / RECORD_LEN as u64;
    let partial = body % RECORD_LEN as u64;
    let limit = if complete {
        if whole < t.records {
            return Err(TraceError::Truncated { path: path.to_path_buf(), expected: t.records, found: whole });
        }
        if body > t.records * RECORD_LEN as u64 {
            return Err(TraceError::TrailingData {
                path: path.to_path_buf(),
                expected: t.records,
                extra_bytes: body - t.records * RECORD_LEN as u64,
            });
        }
        t.records
    } else {
        if partial != 0 {
            salvage.push(format!("{}: ignored a partial record of {partial} byte(s) at the end", path.display()));
        }
        whole
    };
    let mut h = format::CHECKSUM_SEED;
    let (mut entries, mut exits) = (0u64, 0u64);
    let mut last_ts = 0u64;
    let mut prev_kind = 0u8;
    let mut buf = [0u8; RECORD_LEN];
    for i in 0..limit {
        if i == t.records && !complete {
            check_sum(path, t, h)?;
        }
        r.read_exact(&mut buf).map_err(io(path))?;
        let rec = format::decode(&buf);
        if let Err(what) = check_record(&rec, prev_kind, last_ts, nsyms) {
            if complete || i < t.records {
                return Err(TraceError::CorruptRecord { path: path.to_path_buf(), index: i, what });
            }
            salvage.push(format!("{}: cut at record {i} of {whole}: {what}", path.display()));
            return Ok(i);
        }
        if rec.kind != KIND_VALUE {
            last_ts = rec.ts;
        }
        entries += (rec.kind == KIND_ENTRY) as u64;
        exits += (rec.kind == KIND_EXIT) as u64;
        prev_kind = rec.kind;
        h = format::checksum_step(h, &buf);
    }
    if complete || limit == t.records {
        check_sum(path, t, h)?;
    }
    if !complete && limit < t.records {
        salvage.push(format!("{}: the metadata says {} records, the file holds {limit}", path.display(), t.records));
    }
    if complete && (entries != t.entries || exits != t.exits) {
        return Err(TraceError::CorruptRecord {
            path: path.to_path_buf(),
            index: limit,
            what: format!("{entries} entries and {exits} exits, the metadata says {} and {}", t.entries, t.exits),
        });
    }
    Ok(limit)
}

fn check_sum(path: &Path, t: &ThreadMeta, h: u64) -> Result<(), TraceError> {
    if format!("{h:016x}") != t.checksum {
        return Err(TraceError::ChecksumMismatch { path: path.to_path_buf(), expected: t.checksum.clone(), found: h });
    }
    Ok(())
}

fn check_header(r: &mut impl Read, path: &Path, tid: i32, len: u64) -> Result<(), TraceError> {
    let bad = |what: String| TraceError::BadHeader { path: path.to_path_buf(), what };
    if len < THREAD_HEADER_LEN as u64 {
        return Err(bad(format!("the file has {len} bytes, shorter than the {THREAD_HEADER_LEN}-byte header")));
    }
    let mut h = [0u8; THREAD_HEADER_LEN];
    r.read_exact(&mut h).map_err(io(path))?;
    let file_tid = format::parse_thread_header(&h).map_err(bad)?;
    if file_tid != tid {
        return Err(bad(format!("thread id {file_tid}, the metadata says {tid}")));
    }
    Ok(())
}

fn check_record(r: &RawRecord, prev_kind: u8, last_ts: u64, nsyms: u64) -> Result<(), String> {
    match r.kind {
        KIND_ENTRY | KIND_EXIT => {
            if r.ts < last_ts {
                return Err(format!("timestamp {} goes back from {last_ts}", r.ts));
            }
        }
        KIND_VALUE => {
            if prev_kind != KIND_EXIT {
                return Err("a value record that does not follow an exit".into());
            }
        }
        k => return Err(format!("unknown kind {k}")),
    }
    if r.flags != 0 {
        return Err(format!("reserved flags {:#x}", r.flags));
    }
    if r.func as u64 >= nsyms {
        return Err(format!("function id {} is not in the symbol table ({nsyms} symbols)", r.func));
    }
    Ok(())
}

/// One thread's records, in order. Yields errors if the file changed
/// since [`Trace::open`] validated it.
pub struct ThreadRecords {
    r: Option<BufReader<File>>,
    path: PathBuf,
    tid: i32,
    left: u64,
    index: u64,
    pending: Option<RawRecord>,
}

impl ThreadRecords {
    fn open(t: &ThreadTrace) -> Result<ThreadRecords, TraceError> {
        let Some(path) = &t.path else {
            return Ok(ThreadRecords {
                r: None,
                path: PathBuf::new(),
                tid: t.meta.tid,
                left: 0,
                index: 0,
                pending: None,
            });
        };
        let mut f = File::open(path).map_err(io(path))?;
        let mut h = [0u8; THREAD_HEADER_LEN];
        f.read_exact(&mut h).map_err(io(path))?;
        Ok(ThreadRecords {
            r: Some(BufReader::with_capacity(1 << 16, f)),
            path: path.clone(),
            tid: t.meta.tid,
            left: t.records,
            index: 0,
            pending: None,
        })
    }

    fn raw(&mut self) -> Option<Result<RawRecord, TraceError>> {
        if let Some(p) = self.pending.take() {
            return Some(Ok(p));
        }
        if self.left == 0 {
            return None;
        }
        let r = self.r.as_mut()?;
        let mut buf = [0u8; RECORD_LEN];
        if let Err(e) = r.read_exact(&mut buf) {
            self.left = 0;
            return Some(Err(TraceError::Io { path: self.path.clone(), source: e }));
        }
        self.left -= 1;
        self.index += 1;
        Some(Ok(format::decode(&buf)))
    }
}

impl Iterator for ThreadRecords {
    type Item = Result<Record, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        let raw = match self.raw()? {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        let kind = match raw.kind {
            KIND_ENTRY => RecordKind::Entry,
            KIND_EXIT => RecordKind::Exit,
            k => {
                self.left = 0;
                return Some(Err(TraceError::CorruptRecord {
                    path: self.path.clone(),
                    index: self.index - 1,
                    what: format!("kind {k} where an entry or exit was expected (file changed since open?)"),
                }));
            }
        };
        let mut rec = Record { kind, func: FuncId(raw.func), tid: self.tid, ts: raw.ts, depth: raw.depth, value: None };
        if kind == RecordKind::Exit {
            // Look ahead: a value record belongs to this exit.
            match self.raw() {
                Some(Ok(v)) if v.kind == KIND_VALUE => rec.value = Some(v.ts),
                Some(Ok(other)) => self.pending = Some(other),
                Some(Err(e)) => return Some(Err(e)),
                None => {}
            }
        }
        Some(Ok(rec))
    }
}

/// Every thread's records merged by timestamp.
pub struct Merged {
    iters: Vec<(ThreadRecords, Option<Record>)>,
    heap: BinaryHeap<std::cmp::Reverse<(u64, i32, usize)>>,
    failed: bool,
}

impl Iterator for Merged {
    type Item = Result<Record, TraceError>;

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
