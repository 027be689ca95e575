//! The control path: sessions, the background writer, the stop protocol,
//! fork and exit hooks. See the [`crate::record`] module documentation,
//! sections "Writer" (steps D0–D5), "Stop" (S1–S5) and "Fork".

use super::buffer::{self, ThreadBuf, ACTIVE, MODE_COUNT, MODE_MASK, MODE_RECORD};
use super::clock::{self, Calibration, Clock};
use super::format::{self, ClockSource, CountsFile, Meta, Mode, Symbol, SymbolsFile, ThreadMeta, UnattributedDrops};
use super::{ClockChoice, RecordError, RecorderConfig, TraceSummary};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::sync::ForkLock;

// ---------------------------------------------------------------------------
// State.

/// A buffer pointer owned by the registry.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct BufPtr(*mut ThreadBuf);
// SAFETY: buffers are shared between their thread and the control path by
// design; the protocol in buffer.rs governs every access.
unsafe impl Send for BufPtr {}

struct State {
    /// The running session, if any.
    session: Option<Session>,
    /// Every adopted buffer, of any session, until it is freed.
    registry: Vec<BufPtr>,
    /// Function ids: dense, process-wide, stable across sessions.
    symbols: Vec<Symbol>,
    by_addr: BTreeMap<u64, u32>,
    /// Last session epoch used.
    epoch: u64,
}

static STATE: ForkLock<State> = ForkLock::new(State {
    session: None,
    registry: Vec::new(),
    symbols: Vec::new(),
    by_addr: BTreeMap::new(),
    epoch: 0,
});

/// One thread's output within a session.
struct ThreadOut {
    tid: i32,
    name: Option<String>,
    file: Option<File>,
    len: u64,
    records: u64,
    entries: u64,
    exits: u64,
    checksum: u64,
    first_ts: u64,
    last_ts: u64,
    calls: u64,
}

struct Session {
    /// The ACTIVE word of this session.
    id: u64,
    config: RecorderConfig,
    dir: PathBuf,
    dir_ready: bool,
    parent_pid: Option<i32>,
    calibration: Calibration,
    start_unix_ns: u64,
    start_ts: u64,
    ring: u64,
    /// Live threads' outputs, by buffer.
    threads: BTreeMap<BufPtr, ThreadOut>,
    /// Threads that exited, final.
    finished: Vec<ThreadMeta>,
    names: BTreeSet<String>,
    /// Count mode: calls of exited threads, by function id.
    count_totals: Vec<u64>,
    /// Global drop counters when the session started.
    drops_base: [u64; 4],
    io_drops: u64,
    in_flight: u64,
    io_error: Option<String>,
    /// `total_dropped` of the last metadata written.
    last_dropped: u64,
    symbols_written: usize,
    last_counts: Instant,
    writer: Option<std::thread::JoinHandle<()>>,
    stop_requested: bool,
    /// The drain's copy of a ring's records, kept between drains rather
    /// than allocated (megabytes, faulted in afresh, and unmapped or
    /// trimmed by the allocator on free) on every drain.
    scratch: Vec<u8>,
}

fn global_drops() -> [u64; 4] {
    [
        buffer::DROP_CREATING.load(Ordering::Relaxed),
        buffer::DROP_EXITING.load(Ordering::Relaxed),
        buffer::DROP_NOMEM.load(Ordering::Relaxed),
        buffer::DROP_WRITER.load(Ordering::Relaxed),
    ]
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RecordError + 'a {
    move |source| RecordError::Io { what, path: path.to_path_buf(), source }
}

// ---------------------------------------------------------------------------
// Symbols.

pub(crate) fn register_function(addr: usize, name: &str) -> u32 {
    let mut st = STATE.lock();
    let st = &mut *st;
    if let Some(&id) = st.by_addr.get(&(addr as u64)) {
        return id;
    }
    let id = st.symbols.len() as u32;
    st.symbols.push(Symbol { id, addr: addr as u64, name: name.to_string() });
    st.by_addr.insert(addr as u64, id);
    id
}

pub(crate) fn function_count() -> usize {
    STATE.lock().symbols.len()
}

// ---------------------------------------------------------------------------
// Start.

pub(crate) fn start(config: RecorderConfig) -> Result<(), RecordError> {
    if config.buffer_records < 2 && config.mode == Mode::Record {
        return Err(RecordError::Config("buffer_records must be at least 2".into()));
    }
    if config.max_functions == 0 && config.mode == Mode::Count {
        return Err(RecordError::Config("max_functions must be at least 1".into()));
    }
    buffer::ensure_key();
    install_fork_hooks();
    let mut st = STATE.lock();
    if let Some(s) = &st.session {
        return Err(RecordError::AlreadyActive { dir: s.dir.clone() });
    }
    prepare_dir(&config.dir, config.replace_existing)?;
    let source = match config.clock {
        ClockChoice::Auto => clock::detect().source,
        ClockChoice::Force(s) => s,
    };
    Clock::select(source);
    let calibration = Calibration::start(source, config.calibration);
    sweep(&mut st);
    st.epoch += 1;
    let mode_bits = if config.mode == Mode::Record { MODE_RECORD } else { MODE_COUNT };
    let id = st.epoch << 2 | mode_bits;
    let session = new_session(id, config.dir.clone(), None, config, calibration, true);
    publish(id, session.ring, &session.config);
    st.session = Some(session);
    let handle = spawn_writer(id).map_err(RecordError::Spawn);
    match handle {
        Ok(h) => {
            if let Some(s) = st.session.as_mut() {
                s.writer = Some(h);
            }
            Ok(())
        }
        Err(e) => {
            ACTIVE.store(0, Ordering::SeqCst);
            st.session = None;
            Err(e)
        }
    }
}

fn new_session(
    id: u64,
    dir: PathBuf,
    parent_pid: Option<i32>,
    config: RecorderConfig,
    calibration: Calibration,
    dir_ready: bool,
) -> Session {
    let ring = (config.buffer_records.max(2) as u64).next_power_of_two();
    Session {
        id,
        dir,
        dir_ready,
        parent_pid,
        calibration,
        start_unix_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
        start_ts: Clock::now(),
        ring,
        threads: BTreeMap::new(),
        finished: Vec::new(),
        names: BTreeSet::new(),
        count_totals: Vec::new(),
        drops_base: global_drops(),
        io_drops: 0,
        in_flight: 0,
        io_error: None,
        last_dropped: 0,
        symbols_written: usize::MAX,
        last_counts: Instant::now(),
        writer: None,
        stop_requested: false,
        scratch: Vec::new(),
        config,
    }
}

/// Publishes a session to the hot path: configuration words first, then
/// ACTIVE with release (pairs with the acquire load in C3).
fn publish(id: u64, ring: u64, config: &RecorderConfig) {
    buffer::CFG_RING.store(ring, Ordering::Relaxed);
    buffer::CFG_FUNCS.store(config.max_functions as u64, Ordering::Relaxed);
    buffer::CFG_WAKE_HALF.store(config.wake_writer_at_half, Ordering::Relaxed);
    buffer::CFG_PREFAULT.store(config.prefault_buffers, Ordering::Relaxed);
    ACTIVE.store(id, Ordering::Release);
}

/// Makes `dir` ready for a new trace: created if missing; an old textpoke
/// trace is moved to `DIR.old` when `replace`; anything else non-empty is
/// refused.
fn prepare_dir(dir: &Path, replace: bool) -> Result<(), RecordError> {
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir).map_err(io_err("read directory", dir))?;
        if entries.next().is_some() {
            if !(replace && dir.join(format::META_FILE).exists()) {
                return Err(RecordError::DirNotEmpty { dir: dir.to_path_buf() });
            }
            let mut old = dir.as_os_str().to_owned();
            old.push(".old");
            let old = PathBuf::from(old);
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(io_err("remove", &old))?;
            }
            std::fs::rename(dir, &old).map_err(io_err("rename", dir))?;
        }
    }
    std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))
}

fn spawn_writer(id: u64) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("textpoke-writer".into()).spawn(move || writer_main(id))
}

/// Puts the calling thread (the writer) in `SCHED_BATCH`: a producer
/// that wakes it at half-full is not preempted by it. Under the default
/// policy the scheduler ran the woken writer on the waker's CPU at once,
/// stalling the traced thread for the whole drain (2 ms seen here, with
/// the other CPU idle) — 25 ns per call averaged over a short loop. The
/// writer keeps its fair share of CPU time. Best effort: on failure the
/// writer just runs under the default policy.
fn batch_scheduling() {
    // SAFETY: plain syscall on the calling thread with a valid param.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_BATCH, &param);
    }
}

/// The writer thread: drains every `flush_interval`, or sooner when a
/// producer crosses half-full (H7) or the control path wakes it.
fn writer_main(id: u64) {
    buffer::mark_writer_thread();
    batch_scheduling();
    loop {
        // Acquire pairs with wake_writer's release increment.
        let seen = buffer::WAKE.load(Ordering::Acquire);
        let interval = {
            let mut st = STATE.lock();
            match &st.session {
                Some(s) if s.id == id && !s.stop_requested => {}
                _ => break,
            }
            drain(&mut st, false);
            st.session.as_ref().map(|s| s.config.flush_interval).unwrap_or_default()
        };
        crate::sys::futex_wait(&buffer::WAKE, seen, Some(interval));
    }
}

// ---------------------------------------------------------------------------
// Draining.

/// Adopts new buffers, drains every buffer of the session, retires those
/// whose thread exited, frees stale exited ones, and rewrites the
/// metadata (complete = false).
fn drain(st: &mut State, force_counts: bool) {
    for b in buffer::take_incoming() {
        st.registry.push(BufPtr(b));
    }
    let Some(s) = st.session.as_mut() else {
        sweep(st);
        return;
    };
    let mut i = 0;
    while i < st.registry.len() {
        let bp = st.registry[i];
        // SAFETY: registered buffers stay mapped until freed below.
        let b = unsafe { &*bp.0 };
        // D5 first: acquire pairs with X2, so after it every record of an
        // exited thread is published and the drain below takes them all.
        let exited = b.cold.exited.load(Ordering::Acquire) != 0;
        // D0: acquire pairs with reinit's release of `session`.
        let sess = b.p.session.load(Ordering::Acquire);
        if sess == s.id {
            drain_one(s, bp, b);
            if exited {
                retire(s, bp, b);
                st.registry.swap_remove(i);
                // SAFETY: the owner exited (X2 seen) and we drained it.
                unsafe { buffer::free(bp.0) };
                continue;
            }
        } else if exited {
            st.registry.swap_remove(i);
            // SAFETY: the owner exited; its data belonged to a session
            // whose final drain is over.
            unsafe { buffer::free(bp.0) };
            continue;
        }
        i += 1;
    }
    let counts_due =
        s.config.mode == Mode::Count && (force_counts || s.last_counts.elapsed() >= Duration::from_secs(1));
    write_side_files(s, &st.symbols, &st.registry, counts_due, false);
}

/// Frees the exited buffers of no running session.
fn sweep(st: &mut State) {
    for b in buffer::take_incoming() {
        st.registry.push(BufPtr(b));
    }
    let current = st.session.as_ref().map(|s| s.id);
    st.registry.retain(|bp| {
        // SAFETY: registered buffers are mapped.
        let b = unsafe { &*bp.0 };
        let exited = b.cold.exited.load(Ordering::Acquire) != 0;
        if exited && Some(b.p.session.load(Ordering::Acquire)) != current {
            // SAFETY: owner exited, data of a finished session.
            unsafe { buffer::free(bp.0) };
            false
        } else {
            true
        }
    });
}

fn ensure_dir(s: &mut Session) -> bool {
    if !s.dir_ready {
        match std::fs::create_dir_all(&s.dir) {
            Ok(()) => s.dir_ready = true,
            Err(e) => {
                s.io_error.get_or_insert_with(|| format!("create directory {}: {e}", s.dir.display()));
            }
        }
    }
    s.dir_ready
}

/// D1–D4 for one buffer.
fn drain_one(s: &mut Session, bp: BufPtr, b: &ThreadBuf) {
    s.threads.entry(bp).or_insert_with(|| ThreadOut {
        tid: b.p.tid.load(Ordering::Relaxed),
        name: None,
        file: None,
        len: 0,
        records: 0,
        entries: 0,
        exits: 0,
        checksum: format::CHECKSUM_SEED,
        first_ts: 0,
        last_ts: 0,
        calls: 0,
    });
    let cap = b.p.cap.load(Ordering::Relaxed);
    if cap == 0 {
        return; // count mode: counters are read when the counts are written
    }
    // D1: acquire pairs with H7's release of `head`.
    let head = b.p.head.load(Ordering::Acquire);
    let tail = b.cons.tail.load(Ordering::Relaxed);
    if head == tail {
        return;
    }
    // D2: copy the published slots out.
    let ring = b.p.ring.load(Ordering::Relaxed);
    let mask = cap - 1;
    let n = head - tail;
    let mut bytes = std::mem::take(&mut s.scratch);
    bytes.clear();
    bytes.reserve(n as usize * format::RECORD_LEN);
    let (mut entries, mut exits) = (0u64, 0u64);
    let (mut first, mut last) = (0u64, 0u64);
    for pos in tail..head {
        // SAFETY: slots in [tail, head) were written before head was
        // published (D1) and are not overwritten before D4.
        let r = unsafe { ring.add((pos & mask) as usize).read() };
        match r.kind {
            format::KIND_ENTRY => entries += 1,
            format::KIND_EXIT => exits += 1,
            _ => {}
        }
        if r.kind != format::KIND_VALUE {
            if first == 0 {
                first = r.ts;
            }
            last = r.ts;
        }
        bytes.extend_from_slice(&format::encode(&r));
    }
    // D4: give the slots back. Release pairs with H4's acquire of `tail`.
    b.cons.tail.store(head, Ordering::Release);
    // D3: append to the thread's file.
    let ok = ensure_dir(s);
    let dir = s.dir.clone();
    let out = s.threads.get_mut(&bp).expect("inserted above");
    if ok && out.file.is_none() {
        let mut name = format!("tid-{}.bin", out.tid);
        let mut k = 1;
        while s.names.contains(&name) {
            k += 1;
            name = format!("tid-{}-{k}.bin", out.tid);
        }
        let path = dir.join(&name);
        match File::create(&path).and_then(|mut f| f.write_all(&format::thread_header(out.tid)).map(|()| f)) {
            Ok(f) => {
                s.names.insert(name.clone());
                out.name = Some(name);
                out.file = Some(f);
                out.len = format::THREAD_HEADER_LEN as u64;
            }
            Err(e) => {
                s.io_error.get_or_insert_with(|| format!("create {}: {e}", path.display()));
            }
        }
    }
    let written = match out.file.as_mut() {
        Some(f) => match f.write_all(&bytes) {
            Ok(()) => true,
            Err(e) => {
                // Cut the partial write off so the file stays whole records.
                let _ = f.set_len(out.len);
                let _ = f.seek(SeekFrom::Start(out.len));
                s.io_error.get_or_insert_with(|| format!("write {}: {e}", out.name.as_deref().unwrap_or("?")));
                false
            }
        },
        None => false,
    };
    if !written {
        s.io_drops += entries + exits;
        s.scratch = bytes;
        return;
    }
    for chunk in bytes.chunks_exact(format::RECORD_LEN) {
        out.checksum = format::checksum_step(out.checksum, chunk.try_into().expect("16 bytes"));
    }
    out.len += bytes.len() as u64;
    out.records += n;
    out.entries += entries;
    out.exits += exits;
    if out.first_ts == 0 {
        out.first_ts = first;
    }
    if last != 0 {
        out.last_ts = last;
    }
    s.scratch = bytes;
}

/// Calls counted in a live buffer, by function id, for ids below `nsyms`.
fn buffer_counts(b: &ThreadBuf, nsyms: usize) -> impl Iterator<Item = (usize, u64)> + '_ {
    let p = b.c.counters.load(Ordering::Relaxed);
    let n = (b.c.ncounters.load(Ordering::Relaxed) as usize).min(nsyms);
    (0..if p.is_null() { 0 } else { n }).filter_map(move |i| {
        // SAFETY: i < ncounters; the producer updates counters with single
        // aligned stores (K3), read here atomically.
        let v = unsafe { &*(p.add(i) as *const std::sync::atomic::AtomicU64) }.load(Ordering::Relaxed);
        (v != 0).then_some((i, v))
    })
}

/// A thread exited: fold its counts into the totals and keep its final
/// metadata.
fn retire(s: &mut Session, bp: BufPtr, b: &ThreadBuf) {
    let Some(mut out) = s.threads.remove(&bp) else {
        return;
    };
    if s.config.mode == Mode::Count {
        let n = b.c.ncounters.load(Ordering::Relaxed) as usize;
        if s.count_totals.len() < n {
            s.count_totals.resize(n, 0);
        }
        let mut calls = 0;
        for (i, v) in buffer_counts(b, n) {
            s.count_totals[i] += v;
            calls += v;
        }
        out.calls = calls;
    }
    if let Some(f) = out.file.take() {
        let _ = f.sync_data();
    }
    s.finished.push(thread_meta(&out, b, true));
}

fn thread_meta(out: &ThreadOut, b: &ThreadBuf, exited: bool) -> ThreadMeta {
    ThreadMeta {
        tid: out.tid,
        file: out.name.clone(),
        records: out.records,
        entries: out.entries,
        exits: out.exits,
        dropped_full: b.c.dropped_full.load(Ordering::Relaxed),
        dropped_nested: b.c.dropped_nested.load(Ordering::Relaxed),
        dropped_range: b.c.dropped_range.load(Ordering::Relaxed),
        calls: out.calls,
        first_ts: out.first_ts,
        last_ts: out.last_ts,
        checksum: format!("{:016x}", out.checksum),
        exited,
    }
}

/// Writes symbols (when new ones were registered), counts (when `counts`)
/// and the metadata, each atomically (temporary file + rename).
fn write_side_files(s: &mut Session, symbols: &[Symbol], registry: &[BufPtr], counts: bool, complete: bool) {
    let anything = !s.threads.is_empty() || !s.finished.is_empty() || complete;
    if !anything || !ensure_dir(s) {
        return;
    }
    if s.symbols_written != symbols.len() || complete {
        let file = SymbolsFile { symbols: symbols.to_vec() };
        match write_json(&s.dir, format::SYMBOLS_FILE, &file, complete) {
            Ok(()) => s.symbols_written = symbols.len(),
            Err(e) => {
                s.io_error.get_or_insert(e);
            }
        }
    }
    let mut live_calls: BTreeMap<BufPtr, u64> = BTreeMap::new();
    if counts && s.config.mode == Mode::Count {
        let mut totals = s.count_totals.clone();
        totals.resize(totals.len().max(symbols.len()), 0);
        for bp in registry {
            // SAFETY: registered buffers are mapped.
            let b = unsafe { &*bp.0 };
            if b.p.session.load(Ordering::Acquire) != s.id {
                continue;
            }
            let mut calls = 0;
            for (i, v) in buffer_counts(b, symbols.len()) {
                totals[i] += v;
                calls += v;
            }
            live_calls.insert(*bp, calls);
        }
        let file = CountsFile {
            calls: totals.iter().enumerate().filter(|(_, &v)| v != 0).map(|(i, &v)| (i as u32, v)).collect(),
        };
        if let Err(e) = write_json(&s.dir, format::COUNTS_FILE, &file, complete) {
            s.io_error.get_or_insert(e);
        }
        s.last_counts = Instant::now();
    }
    for (bp, calls) in &live_calls {
        if let Some(out) = s.threads.get_mut(bp) {
            out.calls = *calls;
        }
    }
    let mut threads = s.finished.clone();
    for (bp, out) in &s.threads {
        // SAFETY: live outputs belong to registered, mapped buffers.
        threads.push(thread_meta(out, unsafe { &*bp.0 }, false));
    }
    threads.sort_by(|a, b| (a.tid, &a.file).cmp(&(b.tid, &b.file)));
    let now = global_drops();
    let unattributed = UnattributedDrops {
        creating: now[0] - s.drops_base[0],
        exiting: now[1] - s.drops_base[1],
        no_memory: now[2] - s.drops_base[2],
        writer_thread: now[3] - s.drops_base[3],
        io: s.io_drops,
        in_flight_at_stop: s.in_flight,
    };
    s.calibration.refine();
    let total_records = threads.iter().map(|t| t.records).sum();
    let total_dropped = threads.iter().map(|t| t.dropped()).sum::<u64>() + unattributed.total();
    s.last_dropped = total_dropped;
    let meta = Meta {
        format: format::FORMAT_NAME.into(),
        version: format::FORMAT_VERSION,
        complete,
        mode: s.config.mode,
        // SAFETY: getpid has no preconditions.
        pid: unsafe { libc::getpid() },
        parent_pid: s.parent_pid,
        process_name: s.config.process_name.clone().unwrap_or_else(process_name),
        exe: std::fs::read_link("/proc/self/exe").ok().map(|p| p.to_string_lossy().into_owned()),
        clock: s.calibration.info(),
        start_unix_ns: s.start_unix_ns,
        start_ts: s.start_ts,
        end_ts: complete.then(Clock::now),
        buffer_records: if s.config.mode == Mode::Record { s.ring } else { 0 },
        max_functions: if s.config.mode == Mode::Count { s.config.max_functions } else { 0 },
        threads,
        unattributed_drops: unattributed,
        total_records,
        total_dropped,
    };
    if let Err(e) = write_json(&s.dir, format::META_FILE, &meta, complete) {
        s.io_error.get_or_insert(e);
    }
}

fn process_name() -> String {
    std::fs::read_to_string("/proc/self/comm").map(|s| s.trim_end().to_string()).unwrap_or_default()
}

/// Writes `name` atomically: `name.tmp`, (fsync when `sync`), rename.
fn write_json<T: serde::Serialize>(dir: &Path, name: &str, v: &T, sync: bool) -> Result<(), String> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let res = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        serde_json::to_writer_pretty(&mut f, v).map_err(std::io::Error::other)?;
        f.write_all(b"\n")?;
        if sync {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)
    })();
    res.map_err(|e| format!("write {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// Flush and stop.

pub(crate) fn flush() -> Result<TraceSummary, RecordError> {
    let mut st = STATE.lock();
    if st.session.is_none() {
        return Err(RecordError::NotActive);
    }
    drain(&mut st, true);
    let s = st.session.as_ref().expect("checked above");
    if let Some(e) = &s.io_error {
        return Err(RecordError::Write(e.clone()));
    }
    Ok(summary(s, false))
}

fn summary(s: &Session, complete: bool) -> TraceSummary {
    let threads = s.finished.len() + s.threads.len();
    let records =
        s.finished.iter().map(|t| t.records).sum::<u64>() + s.threads.values().map(|t| t.records).sum::<u64>();
    TraceSummary { dir: s.dir.clone(), threads, records, dropped: s.last_dropped, complete }
}

/// Stops the active session: S1–S5 of the module docs.
pub(crate) fn stop() -> Result<TraceSummary, RecordError> {
    // Ask the writer to finish and wait for it, without holding the lock.
    let writer = {
        let mut st = STATE.lock();
        let Some(s) = st.session.as_mut() else {
            return Err(RecordError::NotActive);
        };
        s.stop_requested = true;
        s.writer.take()
    };
    buffer::wake_writer();
    if let Some(h) = writer {
        let _ = h.join();
    }
    let mut st = STATE.lock();
    let Some(id) = st.session.as_ref().map(|s| s.id) else {
        return Err(RecordError::NotActive);
    };
    // S1. SeqCst pairs with C2's SeqCst increment of CREATING.
    ACTIVE.store(0, Ordering::SeqCst);
    // S2: a full barrier on every thread, so a thread that set `busy` (H2)
    // before it is visible to S4, and one that did not sees ACTIVE = 0.
    if crate::sync::sync_cores(crate::sync::best_method()).is_err() {
        std::thread::sleep(Duration::from_millis(10)); // best effort
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    // S3: buffers being created are pushed before CREATING drops to 0.
    // Acquire pairs with C7's release decrement.
    while buffer::CREATING.load(Ordering::Acquire) != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(100));
    }
    let stuck_creating = buffer::CREATING.load(Ordering::Acquire) as u64;
    for b in buffer::take_incoming() {
        st.registry.push(BufPtr(b));
    }
    // S4: wait until no thread is inside a record call on a buffer of this
    // session. Acquire pairs with H8/K4's release store of `busy`.
    let mut stuck = stuck_creating;
    for bp in &st.registry {
        // SAFETY: registered buffers are mapped.
        let b = unsafe { &*bp.0 };
        if b.p.session.load(Ordering::Acquire) != id {
            continue;
        }
        while b.p.busy.load(Ordering::Acquire) != 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(100));
        }
        if b.p.busy.load(Ordering::Acquire) != 0 {
            stuck += 1;
        }
    }
    // S5: the final drain, then every file, then `complete` last.
    if let Some(s) = st.session.as_mut() {
        s.in_flight = stuck;
    }
    drain(&mut st, true);
    let st = &mut *st;
    let mut s = st.session.take().expect("checked above");
    let mut registry_live = Vec::new();
    for bp in &st.registry {
        // SAFETY: registered buffers are mapped.
        let b = unsafe { &*bp.0 };
        if b.p.session.load(Ordering::Acquire) == s.id {
            registry_live.push(*bp);
        }
    }
    for out in s.threads.values_mut() {
        if let Some(f) = &out.file {
            if let Err(e) = f.sync_data() {
                s.io_error.get_or_insert_with(|| format!("sync {}: {e}", out.name.as_deref().unwrap_or("?")));
            }
        }
    }
    let symbols = st.symbols.clone();
    write_side_files(&mut s, &symbols, &registry_live, true, true);
    let result = match &s.io_error {
        Some(e) => Err(RecordError::Write(e.clone())),
        None => Ok(summary(&s, true)),
    };
    sweep(st);
    result
}

// ---------------------------------------------------------------------------
// Fork and exit.

fn install_fork_hooks() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: three `extern "C"` handlers with no arguments.
        unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child)) };
    });
}

extern "C" fn fork_prepare() {
    // SAFETY: released by fork_parent or fork_child on this thread.
    unsafe { STATE.raw_lock() };
}

extern "C" fn fork_parent() {
    // SAFETY: locked by fork_prepare.
    unsafe { STATE.raw_unlock() };
}

/// In the child: only the forking thread exists. Frees every other
/// thread's buffer, and when a session with `follow_fork` was running,
/// starts a session of its own in `DIR/child-<pid>` with a new writer.
extern "C" fn fork_child() {
    // SAFETY: fork_prepare locked STATE in the parent; this child has the
    // only thread, which holds it.
    let st = unsafe { STATE.get_locked() };
    buffer::reset_after_fork();
    let me = BufPtr(buffer::current_buf());
    let mut all: Vec<BufPtr> = std::mem::take(&mut st.registry);
    all.extend(buffer::take_incoming().into_iter().map(BufPtr));
    all.sort();
    all.dedup();
    for bp in all {
        if bp == me {
            st.registry.push(bp);
        } else {
            // SAFETY: its thread does not exist in this process.
            unsafe { buffer::free(bp.0) };
        }
    }
    let mut spawn = None;
    if let Some(mut s) = st.session.take() {
        // The parent's writer does not exist here: forget its handle
        // (joining or detaching it would touch a thread of the parent).
        if let Some(h) = s.writer.take() {
            std::mem::forget(h);
        }
        if s.config.follow_fork {
            // SAFETY: no preconditions.
            let pid = unsafe { libc::getpid() };
            // SAFETY: no preconditions.
            let ppid = unsafe { libc::getppid() };
            st.epoch += 1;
            let id = st.epoch << 2 | (s.id & MODE_MASK);
            let dir = s.dir.join(format!("{}{pid}", format::CHILD_DIR_PREFIX));
            let mut config = s.config.clone();
            config.process_name = None;
            let calibration = s.calibration;
            let child = new_session(id, dir, Some(ppid), config, calibration, false);
            publish(id, child.ring, &child.config);
            st.session = Some(child);
            spawn = Some(id);
        } else {
            ACTIVE.store(0, Ordering::SeqCst);
        }
        drop(s); // closes the parent's files in the child
    }
    if let Some(id) = spawn {
        match spawn_writer(id) {
            Ok(h) => {
                if let Some(s) = st.session.as_mut() {
                    s.writer = Some(h);
                }
            }
            Err(e) => {
                if let Some(s) = st.session.as_mut() {
                    s.io_error = Some(format!("cannot start the writer in the child: {e}"));
                }
            }
        }
    }
    // SAFETY: held since fork_prepare.
    unsafe { STATE.raw_unlock() };
}

/// Registers (once) an `atexit` handler that stops the active session, so
/// a program that returns from `main` or calls `exit` leaves a complete
/// trace.
pub(crate) fn install_exit_flush() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: an `extern "C"` handler with no arguments.
        unsafe { libc::atexit(at_exit) };
    });
}

extern "C" fn at_exit() {
    let active = STATE.lock().session.is_some();
    if active {
        if let Err(e) = stop() {
            eprintln!("textpoke: final trace flush at exit failed: {e}");
        }
    }
}

/// Whether a session is running.
pub(crate) fn is_active() -> bool {
    STATE.lock().session.is_some()
}

/// The clock source of the running session.
pub(crate) fn active_clock() -> Option<ClockSource> {
    STATE.lock().session.as_ref().map(|s| s.calibration.info().source)
}
