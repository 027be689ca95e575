//! The side files of a trace: the exact counts per function
//! (`counts.json`), the symbols of the functions seen, and the metadata
//! (`meta.json`), each replaced whole; written while recording (for a
//! salvage after a crash) and, with `complete`, last at the stop.

use super::{global_drops, BufPtr, Session};
use crate::buffer;
use crate::format::{self, BufferInfo, FullPolicy, Meta, UnattributedDrops};
use crate::writer;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use textpoke::clock::Clock;

/// How often the metadata is rewritten while recording (for a salvage
/// after a crash), at most.
pub(super) const META_INTERVAL: Duration = Duration::from_secs(1);

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
pub(super) fn write_meta(s: &mut Session, registry: &[BufPtr], complete: bool) {
    if !s.ensure_dir() {
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
        pid: textpoke_sys::threads::getpid(),
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
