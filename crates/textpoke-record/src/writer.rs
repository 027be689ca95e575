//! The writer's work on one session: draining the threads' segment chains
//! into their event files (D0–D5), and the side files (symbols, counts,
//! metadata). See the [crate documentation](crate), sections
//! "Writer" and "On-disk format".

use super::buffer::ThreadBuf;
use super::format::{
    self, CountsFile, Symbol, ThreadMeta, UnattributedDrops, KIND_ENTRY, KIND_EXIT, KIND_EXIT_VALUE, SPECIAL_LONG,
    SPECIAL_SYNC,
};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use textpoke::funcs::{self, FuncId};

/// What the writer keeps of one thread's event stream while it scans it:
/// every word passes through [`Scan::words`] once, on its way to disk.
#[derive(Debug, Clone)]
pub(crate) struct Scan {
    /// Words to skip: the rest of a record begun in an earlier range.
    skip: usize,
    /// The time the next compact delta counts from.
    time: u64,
    pub entries: u64,
    pub exits: u64,
    pub words: u64,
    pub checksum: u64,
    pub first_ts: u64,
    pub last_ts: u64,
}

impl Default for Scan {
    fn default() -> Scan {
        Scan {
            skip: 0,
            time: 0,
            entries: 0,
            exits: 0,
            words: 0,
            checksum: format::CHECKSUM_SEED,
            first_ts: 0,
            last_ts: 0,
        }
    }
}

impl Scan {
    /// Folds `words` into the counts and checksum; `seen(func)` for every
    /// event's function.
    pub fn words(&mut self, words: &[u64], seen: &mut impl FnMut(u32)) {
        let mut i = 0;
        let n = words.len();
        while i < n {
            let w = words[i];
            if self.skip > 0 {
                self.skip -= 1;
                i += 1;
                continue;
            }
            match (w & 3) as u8 {
                0 => self.special(&words[i..], seen),
                kind => {
                    self.time += w >> format::DELTA_SHIFT;
                    self.event(kind, (w >> format::FUNC_SHIFT) as u32 & ((1 << format::FUNC_BITS) - 1), seen);
                    if kind == KIND_EXIT_VALUE {
                        self.skip = 1;
                    }
                }
            }
            i += 1;
        }
        for &w in words {
            self.checksum = format::checksum_step(self.checksum, w);
        }
        self.words += n as u64;
    }

    fn event(&mut self, kind: u8, func: u32, seen: &mut impl FnMut(u32)) {
        if kind == KIND_ENTRY {
            self.entries += 1;
        } else {
            self.exits += 1;
        }
        if self.first_ts == 0 {
            self.first_ts = self.time;
        }
        self.last_ts = self.time;
        seen(func);
    }

    /// A special record starting at `rec[0]`. The producer publishes whole
    /// records, so its payload is in `rec`; `skip` steps over it.
    fn special(&mut self, rec: &[u64], seen: &mut impl FnMut(u32)) {
        let w = rec[0];
        let ty = ((w >> 2) & 0x3f) as u8;
        let n = ((w >> 8) & 0xff) as usize;
        match ty {
            SPECIAL_SYNC if rec.len() > 1 => self.time = rec[1],
            SPECIAL_LONG if rec.len() > 2 => {
                self.time = rec[1];
                let kind = (w >> 16) as u8;
                if matches!(kind, KIND_ENTRY | KIND_EXIT | KIND_EXIT_VALUE) {
                    self.event(kind, rec[2] as u32, seen);
                }
            }
            _ => {}
        }
        self.skip = n;
    }
}

/// One thread's output within a session.
pub(crate) struct ThreadOut {
    pub tid: i32,
    pub name: Option<String>,
    pub file: Option<BufWriter<File>>,
    pub scan: Scan,
    /// Calls counted on this thread (summed from its counters).
    pub calls: u64,
}

impl ThreadOut {
    pub fn new(tid: i32) -> ThreadOut {
        ThreadOut { tid, name: None, file: None, scan: Scan::default(), calls: 0 }
    }

    /// The metadata entry of this thread.
    pub fn meta(&self, b: &ThreadBuf, exited: bool) -> ThreadMeta {
        ThreadMeta {
            tid: self.tid,
            file: self.name.clone(),
            words: self.scan.words,
            entries: self.scan.entries,
            exits: self.scan.exits,
            lost: b.s.dropped_full.load(Ordering::Relaxed),
            dropped_nested: b.s.dropped_nested.load(Ordering::Relaxed),
            dropped_range: b.s.dropped_range.load(Ordering::Relaxed),
            calls: self.calls,
            first_ts: self.scan.first_ts,
            last_ts: self.scan.last_ts,
            checksum: format!("{:016x}", self.scan.checksum),
            exited,
        }
    }
}

/// The functions seen in the trace so far, and the symbol file they are
/// appended to (one JSON object per line).
#[derive(Default)]
pub(crate) struct SymbolsOut {
    /// Bit per function id: written to the file already.
    written: Vec<u64>,
    /// Seen in an event since the last [`SymbolsOut::append`].
    pending: Vec<u32>,
    file: Option<BufWriter<File>>,
}

impl SymbolsOut {
    /// Empty, with a written bit for every id the function table can hand
    /// out already in place, so that the crash flush (`crash`, F6) marks
    /// the lines it writes without allocating. Zeroed memory (2 MiB of
    /// address space, pages touched as ids are marked).
    pub fn with_room() -> SymbolsOut {
        SymbolsOut { written: vec![0; textpoke::funcs::MAX_FUNCTIONS / 64], ..SymbolsOut::default() }
    }

    /// The parts the crash flush (F6) works with: the written bits, the
    /// ids seen but not yet appended, and the file (`None` before the first
    /// append).
    pub fn parts(&mut self) -> (&mut [u64], &mut Vec<u32>, Option<&mut BufWriter<File>>) {
        (&mut self.written, &mut self.pending, self.file.as_mut())
    }

    /// Notes that function `id` appears in the trace.
    #[inline]
    pub fn see(&mut self, id: u32) {
        let (w, bit) = (id as usize / 64, 1u64 << (id % 64));
        if self.written.len() <= w {
            self.written.resize(w + 1, 0);
        }
        if self.written[w] & bit == 0 {
            self.written[w] |= bit;
            self.pending.push(id);
        }
    }

    /// Appends the functions seen since the last call to the symbol file
    /// in `dir` (created on first use). Ids the function table does not
    /// know (a caller's own numbers) are written without a name.
    pub fn append(&mut self, dir: &Path) -> Result<(), String> {
        if self.pending.is_empty() && self.file.is_some() {
            return Ok(());
        }
        let path = dir.join(format::SYMBOLS_FILE);
        if self.file.is_none() {
            let f = File::create(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
            self.file = Some(BufWriter::with_capacity(64 << 10, f));
        }
        let f = self.file.as_mut().expect("created above");
        self.pending.sort_unstable();
        for id in self.pending.drain(..) {
            let (addr, name) = match funcs::get(FuncId(id)) {
                Some(f) => (f.addr, f.name.to_string()),
                None => (0, String::new()),
            };
            let line = serde_json::to_string(&Symbol { id, addr, name }).map_err(|e| e.to_string())?;
            writeln!(f, "{line}").map_err(|e| format!("write {}: {e}", path.display()))?;
        }
        f.flush().map_err(|e| format!("write {}: {e}", path.display()))
    }
}

/// Calls counted in a buffer, by function id. Only the pages of the
/// counter array the thread touched are read (`mincore`): the array is
/// sized for every possible function (megabytes) and a thread calls a few,
/// so reading it whole cost a millisecond per thread (seen: 10,000
/// short-lived threads took 25 s to retire).
pub(crate) fn buffer_counts(b: &ThreadBuf) -> Vec<(usize, u64)> {
    let p = b.p.counters.load(Ordering::Relaxed);
    let n = if p.is_null() { 0 } else { b.p.ncounters.load(Ordering::Relaxed) as usize };
    let mut out = Vec::new();
    // SAFETY: the counter array's own mapping, `n` words long.
    let touched = unsafe { textpoke_sys::anon::resident_pages(p as *mut u8, n * 8) };
    let per_page = textpoke_sys::anon::PAGE / 8;
    for page in touched {
        for i in page * per_page..((page + 1) * per_page).min(n) {
            // SAFETY: i < ncounters; the producer updates counters with
            // single aligned stores (K3), read here atomically.
            let v = unsafe { &*(p.add(i) as *const std::sync::atomic::AtomicU64) }.load(Ordering::Relaxed);
            if v != 0 {
                out.push((i, v));
            }
        }
    }
    out
}

/// Calls counted in the process-wide array of calls that had no buffer to
/// be counted in (see `buffer::count_orphan`), by function id.
pub(crate) fn orphan_counts() -> Vec<(usize, u64)> {
    let Some(p) = super::buffer::orphans(false) else { return Vec::new() };
    let n = super::buffer::ORPHANS_LEN;
    let mut out = Vec::new();
    // SAFETY: the array's own mapping, `n` words long, never unmapped.
    let touched = unsafe { textpoke_sys::anon::resident_pages(p as *mut u8, n * 8) };
    let per_page = textpoke_sys::anon::PAGE / 8;
    for page in touched {
        for i in page * per_page..((page + 1) * per_page).min(n) {
            // SAFETY: i < n; updated with atomic adds.
            let v = unsafe { &*p.add(i) }.load(Ordering::Relaxed);
            if v != 0 {
                out.push((i, v));
            }
        }
    }
    out
}

/// Writes `v` as JSON to `dir/name` atomically: `name.tmp`, (fsync when
/// `sync`), rename. Buffered: one write for small files.
pub(crate) fn write_json<T: serde::Serialize>(dir: &Path, name: &str, v: &T, sync: bool) -> Result<(), String> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let res = (|| -> std::io::Result<()> {
        let mut f = BufWriter::with_capacity(256 << 10, File::create(&tmp)?);
        serde_json::to_writer(&mut f, v).map_err(std::io::Error::other)?;
        f.write_all(b"\n")?;
        let f = f.into_inner().map_err(|e| e.into_error())?;
        if sync {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)
    })();
    res.map_err(|e| format!("write {}: {e}", path.display()))
}

/// The metadata's per-thread totals.
pub(crate) fn totals(threads: &[ThreadMeta], unattributed: &UnattributedDrops) -> (u64, u64, u64) {
    let events = threads.iter().map(|t| t.entries + t.exits).sum();
    let dropped = threads.iter().map(|t| t.dropped()).sum::<u64>() + unattributed.total();
    let calls = threads.iter().map(|t| t.calls).sum();
    (events, dropped, calls)
}

/// The counts file of a session: exact calls per function id.
pub(crate) fn counts_file(totals: &[u64]) -> CountsFile {
    CountsFile { calls: totals.iter().enumerate().filter(|(_, &v)| v != 0).map(|(i, &v)| (i as u32, v)).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_counts_and_checksums_across_ranges() {
        let sync = [format::special(SPECIAL_SYNC, 3, 0), 100, 0, 0];
        let e = format::compact(KIND_ENTRY, 4, 0, 5).unwrap();
        let x = format::compact(KIND_EXIT_VALUE, 4, 0, 7).unwrap();
        let long = [format::special(SPECIAL_LONG, 2, KIND_ENTRY as u64), 1 << 40, 9];
        let all = [&sync[..], &[e, x, 0x1234], &long[..]].concat();
        let mut seen = Vec::new();
        let mut whole = Scan::default();
        whole.words(&all, &mut |f| seen.push(f));
        assert_eq!((whole.entries, whole.exits), (2, 1));
        assert_eq!((whole.first_ts, whole.last_ts), (105, 1 << 40));
        assert_eq!(seen, [4, 4, 9]);
        // Drained in three ranges (the producer publishes whole records).
        let mut split = Scan::default();
        for part in [&all[..5], &all[5..7], &all[7..]] {
            split.words(part, &mut |_| {});
        }
        assert_eq!((split.entries, split.exits, split.words), (2, 1, all.len() as u64));
        assert_eq!(split.checksum, whole.checksum);
    }
}
