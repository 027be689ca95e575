//! Draining (the crate docs' D0–D5): new buffers are adopted into the
//! registry, every buffer of the session is followed from the writer's
//! cursor to the producer's published position and its words appended to
//! the thread's file, finished segments are given back, the buffers of
//! exited threads retired and freed.

use super::meta::{write_meta, META_INTERVAL};
use super::{BufPtr, Session, State};
use crate::buffer;
use crate::format::{self, Mode};
use crate::writer::{self, ThreadOut};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::atomic::Ordering;

/// Adopts new buffers, drains every buffer of the session, retires those
/// whose thread exited, frees stale exited ones, and writes the side files
/// (the metadata at most every [`META_INTERVAL`] unless `side_files`).
pub(super) fn drain(st: &mut State, side_files: bool) {
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
    if s.ensure_dir() {
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
    buffer::is_writer_thread() && crate::crash::writer_rests()
}

/// Frees the exited buffers of no running session.
pub(super) fn sweep(st: &mut State) {
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
pub(super) fn mark_pending_cut(s: &mut Session, bp: BufPtr) {
    let b = bp.get();
    let cut = b.s.cut_pending.swap(0, Ordering::Relaxed);
    if cut > 0 && !b.s.seg.load(Ordering::Relaxed).is_null() {
        write_words(s, bp, &[format::special(format::SPECIAL_CUT, 0, cut)]);
    }
}

/// D3: appends `words` to `bp`'s thread's file, scanning them on the way.
fn write_words(s: &mut Session, bp: BufPtr, words: &[u64]) {
    let ok = s.ensure_dir();
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
