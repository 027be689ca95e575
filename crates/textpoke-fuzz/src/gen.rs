//! Recording real traces to fuzz from, with the recorder's library API
//! (`record::start`, `register_function`, `entry`/`exit` from several
//! threads), so that the seeds are what `textpoke record` writes.
//!
//! Each thread walks a random call tree (depths up to 48, a return value
//! on one exit in five) until it has made its share of the events. Names
//! include what escaping must handle (tabs, escapes, bidi overrides, `;`,
//! quotes, long C++ and Rust names). Variants: a count-only trace; an
//! incomplete one (copied after a flush, before the final one: what a
//! crash leaves); small per-thread buffers, so that events are lost and
//! the streams carry gaps; forked children (one stops and leaves a
//! complete trace, one only flushes and `_exit`s, leaving an incomplete
//! one).

use crate::rng::Rng;
use std::path::Path;
use std::time::Duration;
use textpoke_record::{self as record, FuncId, RecorderConfig};

/// What to record.
#[derive(Clone, Debug)]
pub struct GenOptions {
    /// About how many bytes of events, all threads together.
    pub bytes: u64,
    pub threads: usize,
    pub count_only: bool,
    /// Copy the trace after a flush, before the final one.
    pub incomplete: bool,
    /// Small buffers: events are lost (gaps).
    pub lossy: bool,
    /// Fork two children that record too.
    pub fork: bool,
    pub seed: u64,
}

fn names() -> Vec<String> {
    let mut v: Vec<String> = [
        "main",
        "parse_expr",
        "std::vector<int, std::allocator<int> >::push_back(int const&)",
        "ns::Widget::operator()(int) const",
        "<alloc::vec::Vec<T> as core::ops::drop::Drop>::drop",
        "weird\tname",
        "semi;colon",
        "esc\u{1b}[31mred",
        "bidi\u{202e}txet",
        "ünïcødé_函数",
        "quote\"and\\backslash",
        "",
        "new\nline",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(format!("long_{}", "segment::".repeat(40)));
    for i in v.len()..300 {
        v.push(format!("fn_{i}"));
    }
    v
}

fn work(rng: &mut Rng, funcs: &[FuncId], events: u64, count_only: bool, pace: bool) {
    let mut stack: Vec<FuncId> = Vec::new();
    let mut made = 0u64;
    while made < events || !stack.is_empty() {
        let deeper = stack.len() < 48 && made < events && (stack.is_empty() || rng.below(100) < 52 - stack.len());
        if deeper {
            let f = *rng.pick(funcs);
            if count_only {
                record::count(f);
            } else {
                record::entry(f, stack.len() as u32);
            }
            stack.push(f);
        } else if let Some(f) = stack.pop() {
            if !count_only {
                if rng.one_in(5) {
                    record::exit_value(f, stack.len() as u32, rng.next_u64() >> rng.below(64));
                } else {
                    record::exit(f, stack.len() as u32);
                }
            }
        }
        made += 1;
        if pace && made.is_multiple_of(4096) {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// Records a trace into `dir` (which must not exist); returns a summary
/// line.
pub fn record_trace(dir: &Path, o: &GenOptions) -> Result<String, String> {
    let funcs: Vec<FuncId> =
        names().iter().enumerate().map(|(i, n)| record::register_function(0x40_0000 + i * 0x40, n)).collect();
    let target = if o.incomplete { dir.with_extension("recording") } else { dir.to_path_buf() };
    let mut cfg = RecorderConfig::new(&target);
    cfg.process_name = Some("fuzz-seed".into());
    if o.lossy {
        cfg.segment_bytes = 8192;
        cfg.thread_limit = 16384;
    }
    if o.count_only {
        cfg = cfg.count_only();
    }
    let rec = record::start(cfg).map_err(|e| format!("cannot record into {}: {e}", target.display()))?;
    let per_thread = o.bytes / 8 / o.threads.max(1) as u64;
    let handles: Vec<_> = (0..o.threads)
        .map(|k| {
            let funcs = funcs.clone();
            let (seed, count_only, pace) = (o.seed ^ (k as u64) << 32, o.count_only, !o.lossy);
            std::thread::spawn(move || work(&mut Rng::new(seed), &funcs, per_thread, count_only, pace))
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| "a recording thread panicked".to_string())?;
    }
    if o.fork {
        for stop in [true, false] {
            // SAFETY: only this thread runs now; the child records, stops
            // or flushes its session, and _exits.
            let pid = unsafe { libc::fork() };
            if pid < 0 {
                return Err(format!("fork: {}", std::io::Error::last_os_error()));
            }
            if pid == 0 {
                work(&mut Rng::new(o.seed ^ 0xc41d), &funcs, 2000, o.count_only, false);
                let ok = if stop { record::stop_active().is_ok() } else { record::flush_active().is_ok() };
                // SAFETY: leave without running this process's exit path.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) };
            }
            let mut status = 0;
            // SAFETY: our child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
                return Err(format!("the forked child {pid} failed (status {status:#x})"));
            }
        }
    }
    if o.incomplete {
        rec.flush().map_err(|e| format!("flush: {e}"))?;
        copy_dir(&target, dir).map_err(|e| format!("cannot copy {} to {}: {e}", target.display(), dir.display()))?;
        rec.stop().map_err(|e| format!("stop: {e}"))?;
        std::fs::remove_dir_all(&target).map_err(|e| format!("cannot remove {}: {e}", target.display()))?;
        return Ok(format!("{}: an incomplete trace (copied after a flush)", dir.display()));
    }
    let s = rec.stop().map_err(|e| format!("stop: {e}"))?;
    Ok(format!(
        "{}: {} thread(s), {} events, {} calls, {} lost, complete: {}",
        s.dir.display(),
        s.threads,
        s.events,
        s.calls,
        s.dropped,
        s.complete
    ))
}
