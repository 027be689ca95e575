//! The control path: sessions, the background writer thread, the stop
//! protocol, fork and exit hooks. See the [crate documentation](crate),
//! sections "Writer" (steps D0–D5), "Stop" (S1–S5) and
//! "Fork".

use super::buffer::{self, ThreadBuf, ACTIVE, MODE_COUNT, MODE_MASK, MODE_RECORD};
use super::format::{self, BufferInfo, FullPolicy, Meta, Mode, ThreadMeta, UnattributedDrops};
use super::writer::{self, SymbolsOut, ThreadOut};
use super::{ClockChoice, RecordError, RecorderConfig, TraceSummary};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use textpoke::clock::{self, Calibration, Clock};

use textpoke::sync::ForkLock;

// ---------------------------------------------------------------------------
// State.

/// A buffer pointer owned by the registry.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct BufPtr(pub(super) *mut ThreadBuf);
// SAFETY: buffers are shared between their thread and the control path by
// design; the protocol in buffer.rs governs every access.
unsafe impl Send for BufPtr {}

impl BufPtr {
    pub(super) fn get(&self) -> &ThreadBuf {
        // SAFETY: registered buffers stay mapped until freed by the
        // control path, which removes them from the registry first.
        unsafe { &*self.0 }
    }
}

pub(super) struct State {
    /// The running session, if any.
    pub(super) session: Option<Session>,
    /// Every adopted buffer, of any session, until it is freed.
    pub(super) registry: Vec<BufPtr>,
    /// Last session epoch used.
    epoch: u64,
}

pub(super) static STATE: ForkLock<State> = ForkLock::new(State { session: None, registry: Vec::new(), epoch: 0 });

pub(super) struct Session {
    /// The ACTIVE word of this session.
    pub(super) id: u64,
    pub(super) config: RecorderConfig,
    pub(super) dir: PathBuf,
    pub(super) dir_ready: bool,
    pub(super) parent_pid: Option<i32>,
    pub(super) calibration: Calibration,
    pub(super) start_unix_ns: u64,
    pub(super) start_ts: u64,
    /// Live threads' outputs, by buffer.
    pub(super) threads: BTreeMap<BufPtr, ThreadOut>,
    /// Threads that exited, final.
    pub(super) finished: Vec<ThreadMeta>,
    /// File names used.
    pub(super) names: BTreeSet<String>,
    /// Calls of exited threads, by function id.
    pub(super) count_totals: Vec<u64>,
    pub(super) symbols: SymbolsOut,
    /// Global drop counters when the session started.
    pub(super) drops_base: [u64; 4],
    pub(super) io_drops: u64,
    pub(super) in_flight: u64,
    pub(super) io_error: Option<String>,
    /// `total_dropped` of the last metadata written.
    pub(super) last_dropped: u64,
    /// Calls counted with no thread's buffer (`unattributed_calls`).
    pub(super) orphan_calls: u64,
    /// When the metadata was last written, and whether anything changed
    /// since (a thread appeared or exited).
    pub(super) last_meta: Option<Instant>,
    pub(super) meta_due: bool,
    /// Words appended to the thread files so far (a pass that adds none
    /// is idle: see [`drain`]).
    pub(super) words_out: u64,
    pub(super) writer: Option<std::thread::JoinHandle<()>>,
    pub(super) stop_requested: bool,
}

pub(super) fn global_drops() -> [u64; 4] {
    [
        buffer::DROP_CREATING.load(Ordering::Relaxed),
        buffer::DROP_EXITING.load(Ordering::Relaxed),
        buffer::DROP_NOMEM.load(Ordering::Relaxed),
        buffer::DROP_WRITER.load(Ordering::Relaxed),
    ]
}

/// How often the metadata is rewritten while recording (for a salvage
/// after a crash), at most.
const META_INTERVAL: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------
// Start.

pub(crate) fn start(config: RecorderConfig) -> Result<(), RecordError> {
    config.validate()?;
    super::crash::reset(); // a flush that found the recorder busy is over
    buffer::ensure_key();
    install_fork_hooks();
    let mut st = STATE.lock();
    if let Some(s) = &st.session {
        return Err(RecordError::AlreadyActive { dir: s.dir.clone() });
    }
    super::dir::prepare(&config.dir, config.replace_existing)?;
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
    let mut session = new_session(id, config.dir.clone(), None, config, calibration, true);
    write_meta(&mut session, &[], false);
    publish(id, &session.config);
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
        threads: BTreeMap::new(),
        finished: Vec::new(),
        names: BTreeSet::new(),
        count_totals: Vec::new(),
        symbols: SymbolsOut::with_room(),
        drops_base: global_drops(),
        io_drops: 0,
        in_flight: 0,
        io_error: None,
        last_dropped: 0,
        orphan_calls: 0,
        last_meta: None,
        meta_due: true,
        words_out: 0,
        writer: None,
        stop_requested: false,
        config,
    }
}

/// Publishes a session to the hot path: configuration words first, then
/// ACTIVE with release (pairs with the acquire load in C3).
fn publish(id: u64, config: &RecorderConfig) {
    let record = id & MODE_MASK == MODE_RECORD;
    buffer::CFG_SEGMENT.store(if record { config.segment_bytes as u64 } else { 0 }, Ordering::Relaxed);
    buffer::CFG_FUNCS.store(config.max_functions as u64, Ordering::Relaxed);
    buffer::CFG_THREAD_LIMIT.store(config.thread_limit as u64, Ordering::Relaxed);
    buffer::CFG_PREFAULT.store(config.prefault_buffers, Ordering::Relaxed);
    buffer::MEM_LIMIT.store(config.memory_limit as u64, Ordering::Relaxed);
    buffer::MEM_PEAK.store(buffer::MEM_USED.load(Ordering::Relaxed), Ordering::Relaxed);
    buffer::reset_orphans();
    ACTIVE.store(id, Ordering::Release);
}

fn spawn_writer(id: u64) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("textpoke-writer".into()).spawn(move || writer_main(id))
}

/// Puts the calling thread (the writer) in `SCHED_BATCH`: a producer
/// that wakes it when a segment fills is not preempted by it. Under the
/// default policy the scheduler ran the woken writer on the waker's CPU at
/// once, stalling the traced thread for the whole drain (2 ms seen here,
/// with the other CPU idle). The writer keeps its fair share of CPU time.
/// Best effort: on failure the writer just runs under the default policy.
fn batch_scheduling() {
    // SAFETY: plain syscall on the calling thread with a valid param.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_BATCH, &param);
    }
}

/// The writer thread: drains every `flush_interval`, or sooner when a
/// producer finishes a segment (G2) or the control path wakes it.
fn writer_main(id: u64) {
    buffer::mark_writer_thread();
    batch_scheduling();
    loop {
        if super::crash::writer_rests() {
            // F2/F8: a fatal signal's flush wants the lock (a writer busy
            // with threads that fill segments would take it again at once)
            // or has just written the trace, which a pass would rewrite
            // without saying so, while the process dies.
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
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
        textpoke::sys::futex_wait(&buffer::WAKE, seen, Some(interval));
    }
}

// ---------------------------------------------------------------------------
// Draining.

/// Adopts new buffers, drains every buffer of the session, retires those
/// whose thread exited, frees stale exited ones, and writes the side files
/// (the metadata at most every [`META_INTERVAL`] unless `side_files`).
fn drain(st: &mut State, side_files: bool) {
    for b in buffer::take_incoming() {
        st.registry.push(BufPtr(b));
    }
    let Some(s) = st.session.as_mut() else {
        sweep(st);
        return;
    };
    let words_before = s.words_out;
    let mut i = 0;
    while i < st.registry.len() {
        if yield_to_crash() {
            return;
        }
        let bp = st.registry[i];
        let b = bp.get();
        // D5 first: acquire pairs with X2, so after it every event of an
        // exited thread is published and the drain below takes them all.
        let exited = b.cold.exited.load(Ordering::Acquire) != 0;
        // D0: acquire pairs with reinit's release of `session`.
        let sess = b.p.session.load(Ordering::Acquire);
        if sess == s.id {
            drain_one(s, bp);
            if exited {
                retire(s, bp);
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
    if ensure_dir(s) {
        if let Err(e) = s.symbols.append(&s.dir) {
            s.io_error.get_or_insert(e);
        }
    }
    // The side files follow the events: at most every META_INTERVAL while
    // events flow, and at the first idle pass after some did (a program
    // that waits, or is about to be killed, has its counts on disk); in
    // count mode (no events to see) every META_INTERVAL.
    let active = s.words_out != words_before;
    if active || s.config.mode == Mode::Count {
        s.meta_due = true;
    }
    let idle_write = !active && s.config.mode == Mode::Record;
    let due = s.meta_due && (idle_write || s.last_meta.is_none_or(|t| t.elapsed() >= META_INTERVAL));
    if side_files || due {
        let registry = st.registry.clone();
        if let Some(s) = st.session.as_mut() {
            write_meta(s, &registry, false);
        }
    }
}

/// Whether the writer thread must end its pass now: a fatal signal's
/// flush waits for the lock (F2). A producer that fills segments as fast
/// as the writer drains them keeps one pass going; the final drain of a
/// stop (on another thread) goes on.
fn yield_to_crash() -> bool {
    buffer::is_writer_thread() && super::crash::writer_rests()
}

/// Frees the exited buffers of no running session.
fn sweep(st: &mut State) {
    for b in buffer::take_incoming() {
        st.registry.push(BufPtr(b));
    }
    let current = st.session.as_ref().map(|s| s.id);
    st.registry.retain(|bp| {
        let b = bp.get();
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

/// D1–D4 for one buffer: follows its segment chain from the writer's
/// cursor to the producer's published position, appending the words to
/// the thread's file and giving finished segments back.
fn drain_one(s: &mut Session, bp: BufPtr) {
    let b = bp.get();
    if let std::collections::btree_map::Entry::Vacant(v) = s.threads.entry(bp) {
        v.insert(ThreadOut::new(b.p.tid.load(Ordering::Relaxed)));
        s.meta_due = true;
    }
    loop {
        let seg = b.cons.drain_seg.load(Ordering::Relaxed);
        if seg.is_null() {
            return; // count mode: counters are read when counts are written
        }
        if yield_to_crash() {
            return; // the cursor is where this pass got to
        }
        // SAFETY: the cursor's segment is mapped until given back below.
        let sr = unsafe { &*seg };
        let from = b.cons.drain_pos.load(Ordering::Relaxed);
        // D1: acquire pairs with H7's release of `pos`.
        let pos = b.p.pos.load(Ordering::Acquire);
        if pos >= sr.data() as u64 && pos <= sr.data_end() as u64 {
            write_range(s, bp, from, pos);
            b.cons.drain_pos.store(pos, Ordering::Relaxed);
            return;
        }
        // D2: the producer moved on; acquire pairs with G2's release of
        // `next`, after which `used` is final.
        let next = sr.next.load(Ordering::Acquire);
        if next.is_null() {
            return; // not yet visible: next time
        }
        let end = sr.data() as u64 + sr.used.load(Ordering::Relaxed);
        write_range(s, bp, from, end);
        // SAFETY: just mapped segments are linked; `next` is live.
        let nr = unsafe { &*next };
        b.cons.drain_seg.store(next, Ordering::Relaxed);
        b.cons.drain_pos.store(nr.data() as u64, Ordering::Relaxed);
        // D4: drained and left behind by the producer.
        // SAFETY: the producer's `next` is set; we drained up to `used`.
        unsafe { buffer::give_back(b, seg) };
    }
}

/// D3 for the words at `[from, to)`, addresses in a segment of `bp`.
fn write_range(s: &mut Session, bp: BufPtr, from: u64, to: u64) {
    if to <= from {
        return;
    }
    // SAFETY: [from, to) lies in a segment's data below the published
    // position (or its final `used`): written before the release store
    // we acquired, and not reused before we give the segment back.
    let words = unsafe { std::slice::from_raw_parts(from as *const u64, ((to - from) / 8) as usize) };
    write_words(s, bp, words);
}

/// The cut events of a thread whose stream ends before its next event
/// could mark them (X2, or the session's end): marked at the end.
fn mark_pending_cut(s: &mut Session, bp: BufPtr) {
    let b = bp.get();
    let cut = b.s.cut_pending.swap(0, Ordering::Relaxed);
    if cut > 0 && !b.s.seg.load(Ordering::Relaxed).is_null() {
        write_words(s, bp, &[format::special(format::SPECIAL_CUT, 0, cut)]);
    }
}

/// D3: appends `words` to `bp`'s thread's file, scanning them on the way.
fn write_words(s: &mut Session, bp: BufPtr, words: &[u64]) {
    let ok = ensure_dir(s);
    let dir = s.dir.clone();
    let out = s.threads.get_mut(&bp).expect("inserted by drain_one");
    if ok && out.file.is_none() {
        let mut name = format!("tid-{}.bin", out.tid);
        let mut k = 1;
        while s.names.contains(&name) {
            k += 1;
            name = format!("tid-{}-{k}.bin", out.tid);
        }
        let path = dir.join(&name);
        let made = File::create(&path).and_then(|f| {
            let mut w = BufWriter::with_capacity(64 << 10, f);
            w.write_all(&format::thread_header(out.tid)).map(|()| w)
        });
        match made {
            Ok(w) => {
                s.names.insert(name.clone());
                out.name = Some(name);
                out.file = Some(w);
                s.meta_due = true;
            }
            Err(e) => {
                s.io_error.get_or_insert_with(|| format!("create {}: {e}", path.display()));
            }
        }
    }
    s.words_out += words.len() as u64;
    let symbols = &mut s.symbols;
    let before = (out.scan.entries, out.scan.exits);
    out.scan.words(words, &mut |f| symbols.see(f));
    let bytes = words_as_bytes(words);
    let written = match out.file.as_mut() {
        Some(f) => match f.write_all(bytes) {
            Ok(()) => true,
            Err(e) => {
                s.io_error.get_or_insert_with(|| format!("write {}: {e}", out.name.as_deref().unwrap_or("?")));
                false
            }
        },
        None => false,
    };
    if !written {
        s.io_drops += out.scan.entries - before.0 + out.scan.exits - before.1;
    }
}

/// The little-endian bytes of `words` (x86-64 and aarch64 are little-endian).
fn words_as_bytes(words: &[u64]) -> &[u8] {
    // SAFETY: u64 has no padding; the bytes live as long as the words.
    unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, std::mem::size_of_val(words)) }
}

/// A thread exited: fold its counts into the totals, close its file and
/// keep its final metadata.
fn retire(s: &mut Session, bp: BufPtr) {
    mark_pending_cut(s, bp);
    let Some(mut out) = s.threads.remove(&bp) else {
        return;
    };
    let b = bp.get();
    let mut calls = 0;
    for (i, v) in writer::buffer_counts(b) {
        if s.count_totals.len() <= i {
            s.count_totals.resize(i + 1, 0);
        }
        s.count_totals[i] += v;
        calls += v;
    }
    out.calls = calls;
    if let Some(mut f) = out.file.take() {
        if let Err(e) = f.flush() {
            s.io_error.get_or_insert_with(|| format!("write {}: {e}", out.name.as_deref().unwrap_or("?")));
        }
    }
    s.finished.push(out.meta(b, true));
    s.meta_due = true;
}

/// Sums the calls of the session's live buffers (in `registry`) and its
/// exited threads; sets each live thread's `calls`.
fn sum_counts(s: &mut Session, registry: &[BufPtr]) -> Vec<u64> {
    let mut totals = s.count_totals.clone();
    for bp in registry {
        let b = bp.get();
        if b.p.session.load(Ordering::Acquire) != s.id {
            continue;
        }
        let mut calls = 0;
        for (i, v) in writer::buffer_counts(b) {
            if totals.len() <= i {
                totals.resize(i + 1, 0);
            }
            totals[i] += v;
            calls += v;
        }
        if let Some(out) = s.threads.get_mut(bp) {
            out.calls = calls;
        }
    }
    // Calls that had no buffer to be counted in (C1').
    let mut orphans = 0;
    for (i, v) in writer::orphan_counts() {
        if totals.len() <= i {
            totals.resize(i + 1, 0);
        }
        totals[i] += v;
        orphans += v;
    }
    s.orphan_calls = orphans;
    totals
}

/// Writes the counts (exact calls per function, and the symbols of the
/// functions called) and the metadata, each atomically; `complete` last.
fn write_meta(s: &mut Session, registry: &[BufPtr], complete: bool) {
    if !ensure_dir(s) {
        return;
    }
    // The thread files first, so the metadata never counts words that are
    // not in them yet.
    for out in s.threads.values_mut() {
        if let Some(Err(e)) = out.file.as_mut().map(|f| f.flush()) {
            s.io_error.get_or_insert_with(|| format!("write {}: {e}", out.name.as_deref().unwrap_or("?")));
        }
    }
    let totals = sum_counts(s, registry);
    for (id, _) in totals.iter().enumerate().filter(|(_, &v)| v != 0) {
        s.symbols.see(id as u32);
    }
    if let Err(e) = s.symbols.append(&s.dir) {
        s.io_error.get_or_insert(e);
    }
    let sync = complete && s.config.sync_files;
    if let Err(e) = writer::write_json(&s.dir, format::COUNTS_FILE, &writer::counts_file(&totals), sync) {
        s.io_error.get_or_insert(e);
    }
    let mut threads = s.finished.clone();
    for (bp, out) in &s.threads {
        threads.push(out.meta(bp.get(), false));
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
    if complete {
        s.calibration.refine();
    }
    let (total_events, total_dropped, thread_calls) = writer::totals(&threads, &unattributed);
    let total_calls = thread_calls + s.orphan_calls;
    s.last_dropped = total_dropped;
    let c = &s.config;
    let meta = Meta {
        format: format::FORMAT_NAME.into(),
        version: format::FORMAT_VERSION,
        complete,
        mode: c.mode,
        // SAFETY: getpid has no preconditions.
        pid: unsafe { libc::getpid() },
        parent_pid: s.parent_pid,
        process_name: c.process_name.clone().unwrap_or_else(process_name),
        exe: std::fs::read_link("/proc/self/exe").ok().map(|p| p.to_string_lossy().into_owned()),
        clock: s.calibration.info(),
        start_unix_ns: s.start_unix_ns,
        start_ts: s.start_ts,
        end_ts: complete.then(Clock::now),
        buffers: BufferInfo {
            segment_bytes: c.segment_bytes as u64,
            thread_limit: c.thread_limit as u64,
            memory_limit: c.memory_limit as u64,
            policy: FullPolicy::Discard,
            peak_bytes: buffer::MEM_PEAK.load(Ordering::Relaxed),
        },
        max_functions: c.max_functions,
        threads,
        unattributed_drops: unattributed,
        unattributed_calls: s.orphan_calls,
        total_events,
        total_dropped,
        total_calls,
        ended_by: None,
    };
    if let Err(e) = writer::write_json(&s.dir, format::META_FILE, &meta, sync) {
        s.io_error.get_or_insert(e);
    }
    s.last_meta = Some(Instant::now());
    s.meta_due = false;
}

fn process_name() -> String {
    std::fs::read_to_string("/proc/self/comm").map(|s| s.trim_end().to_string()).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Flush and stop.

pub(crate) fn flush() -> Result<TraceSummary, RecordError> {
    let mut st = STATE.lock();
    if st.session.is_none() {
        return Err(RecordError::NotActive);
    }
    if !super::crash::writer_rests() {
        drain(&mut st, true); // not over a crash flush's metadata (F8)
    }
    flush_files(st.session.as_mut().expect("checked above"));
    let s = st.session.as_ref().expect("checked above");
    if let Some(e) = &s.io_error {
        return Err(RecordError::Write(e.clone()));
    }
    Ok(summary(s, false))
}

/// Pushes the threads' buffered file writes to the kernel.
fn flush_files(s: &mut Session) {
    for out in s.threads.values_mut() {
        if let Some(f) = out.file.as_mut() {
            if let Err(e) = f.flush() {
                s.io_error.get_or_insert_with(|| format!("write {}: {e}", out.name.as_deref().unwrap_or("?")));
            }
        }
    }
}

fn summary(s: &Session, complete: bool) -> TraceSummary {
    let live = s.threads.values().map(|t| (t.scan.entries + t.scan.exits, t.calls));
    let done = s.finished.iter().map(|t| (t.entries + t.exits, t.calls));
    let (events, calls) = live.chain(done).fold((0, 0), |(e, c), (te, tc)| (e + te, c + tc));
    let threads = s.finished.len() + s.threads.len();
    TraceSummary { dir: s.dir.clone(), threads, events, calls, dropped: s.last_dropped, complete }
}

/// Stops the active session: S1–S5 of the module docs.
pub(crate) fn stop() -> Result<TraceSummary, RecordError> {
    // A process that stops normally outlived any crash flush (F8).
    super::crash::reset();
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
    if textpoke::sync::sync_cores(textpoke::sync::best_method()).is_err() {
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
        let b = bp.get();
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
    drain(&mut st, false);
    let st = &mut *st;
    let mut s = st.session.take().expect("checked above");
    let live: Vec<BufPtr> = s.threads.keys().copied().collect();
    for bp in live {
        mark_pending_cut(&mut s, bp);
    }
    let live: Vec<BufPtr> =
        st.registry.iter().copied().filter(|bp| bp.get().p.session.load(Ordering::Acquire) == s.id).collect();
    flush_files(&mut s);
    if s.config.sync_files {
        for out in s.threads.values() {
            if let Some(Err(e)) = out.file.as_ref().map(|f| f.get_ref().sync_data()) {
                s.io_error.get_or_insert_with(|| format!("sync {}: {e}", out.name.as_deref().unwrap_or("?")));
            }
        }
    }
    write_meta(&mut s, &live, true);
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
            publish(id, &child.config);
            st.session = Some(child);
            spawn = Some(id);
        } else {
            ACTIVE.store(0, Ordering::SeqCst);
        }
        // The parent's files: their buffers hold the parent's unwritten
        // data, which the parent writes; close without flushing.
        for out in s.threads.values_mut() {
            if let Some(f) = out.file.take() {
                let (f, _) = f.into_parts();
                drop(f);
            }
        }
        drop(s);
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
pub(crate) fn active_clock() -> Option<format::ClockSource> {
    STATE.lock().session.as_ref().map(|s| s.calibration.info().source)
}
