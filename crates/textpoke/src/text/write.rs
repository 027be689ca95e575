//! Writing bytes into code pages.
//!
//! Two ways, chosen automatically per batch:
//!
//! - **mprotect**: each page range is made writable *and* executable for the
//!   duration of the commit (never writable-only: other threads execute
//!   those pages meanwhile), written with plain stores, and given back its
//!   exact original protection at the end.
//! - **/proc/self/mem**: `pwrite` through the process's own memory file. The
//!   kernel writes with FOLL_FORCE, so no page protection ever changes. This
//!   is the only way in a process that set
//!   `prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)`, where `mprotect` to
//!   writable+executable fails with EACCES.
//!
//! Preparing the writer does everything that can fail before the first byte
//! is written: the protection changes, or opening the file and rewriting one
//! unchanged byte per page (which also breaks copy-on-write sharing up
//! front), so that a batch either writes nothing or writes everything.
//!
//! # Guarded pages (arm64 `PROT_BTI`)
//!
//! `mprotect` sets a page's whole protection, and `/proc/self/maps` does
//! not show arm64's `PROT_BTI`, the bit that makes a page enforce branch
//! targets (the loader sets it on the code of objects built with BTI, when
//! the CPU has it). A run's protection is therefore `/proc/self/maps`'
//! bits plus `PROT_BTI` when [`sys::bti::Guarded`](crate::sys::bti::Guarded)
//! says the page is guarded now (smaps natively, the loader's rule under
//! qemu): the guard stays on while the page is writable and comes back
//! with the rest, and is never added to a page that did not have it (an
//! object built without BTI, a JIT's code). Elsewhere nothing is guarded
//! and nothing changes. The /proc/self/mem method changes no protection
//! (`pwrite` with FOLL_FORCE), so it keeps the guard as it is.

use crate::sys::bti::{Guarded, PROT_BTI};
use crate::sys::maps::Maps;
use crate::sys::mem::{self, ProcMem};
use std::io;

pub use crate::sys::mem::page_size;

/// How bytes get into code pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMethod {
    /// Temporarily add PROT_WRITE, store, restore.
    Mprotect,
    /// `pwrite` to `/proc/self/mem`.
    ProcMem,
}

impl std::fmt::Display for WriteMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WriteMethod::Mprotect => "mprotect",
            WriteMethod::ProcMem => "/proc/self/mem",
        })
    }
}

/// A run of pages with one original protection (`PROT_BTI` included on
/// a guarded page: see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageRun {
    pub start: usize,
    pub len: usize,
    pub prot: libc::c_int,
}

/// The page runs covering `ranges` (address, length), with the protection
/// each page has now according to `maps`, `PROT_BTI` included for a
/// guarded page (module docs). `None` if a page is unmapped. Ranges sorted
/// by address (a validated plan's) cost one look-up per page.
pub(crate) fn page_runs(maps: &Maps, ranges: impl Iterator<Item = (usize, usize)>) -> Option<Vec<PageRun>> {
    page_runs_guarded(maps, &Guarded::read(), ranges)
}

/// [`page_runs`] with the guarded ranges given.
fn page_runs_guarded(
    maps: &Maps,
    guarded: &Guarded,
    ranges: impl Iterator<Item = (usize, usize)>,
) -> Option<Vec<PageRun>> {
    let ps = page_size();
    let mut pages: Vec<(usize, libc::c_int)> = Vec::new();
    for (addr, len) in ranges {
        let mut p = addr & !(ps - 1);
        while p < addr + len {
            if pages.last().is_none_or(|&(last, _)| last != p) {
                let bti = if guarded.contains(p) { PROT_BTI } else { 0 };
                pages.push((p, maps.find(p)?.prot() | bti));
            }
            p += ps;
        }
    }
    pages.sort_unstable();
    pages.dedup_by_key(|p| p.0);
    let mut runs: Vec<PageRun> = Vec::new();
    for (p, prot) in pages {
        match runs.last_mut() {
            Some(r) if r.start + r.len == p && r.prot == prot => r.len += ps,
            _ => runs.push(PageRun { start: p, len: ps, prot }),
        }
    }
    Some(runs)
}

/// Ready to write; restores everything when finished or dropped.
pub(crate) struct Writer {
    method: WriteMethod,
    runs: Vec<PageRun>,
    /// Runs whose protection was changed (mprotect) and must be restored.
    changed: usize,
    /// `/proc/self/mem` (the ProcMem method).
    mem: Option<ProcMem>,
}

impl Writer {
    pub fn method(&self) -> WriteMethod {
        self.method
    }

    /// Prepares to write into `runs`. `forced` picks a method; otherwise
    /// mprotect unless MDWE forbids it or the kernel refuses it.
    pub fn prepare(runs: Vec<PageRun>, forced: Option<WriteMethod>) -> io::Result<Writer> {
        let mut w = Writer { method: WriteMethod::Mprotect, runs, changed: 0, mem: None };
        let want = forced.unwrap_or(if crate::sys::mdwe_refuses_exec_gain() {
            WriteMethod::ProcMem
        } else {
            WriteMethod::Mprotect
        });
        if want == WriteMethod::Mprotect {
            match w.unprotect() {
                Ok(()) => return Ok(w),
                Err(e) if forced.is_some() => return Err(e),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)) => w.restore()?,
                Err(e) => return Err(e),
            }
        }
        w.method = WriteMethod::ProcMem;
        w.open_mem()?;
        Ok(w)
    }

    fn unprotect(&mut self) -> io::Result<()> {
        for r in &self.runs {
            // SAFETY: the run is mapped and page-aligned (checked against
            // /proc/self/maps); adding PROT_WRITE keeps every existing
            // permission (PROT_BTI too: module docs), so threads running
            // this code are unaffected.
            unsafe { mem::protect(r.start, r.len, r.prot | libc::PROT_WRITE) }?;
            self.changed += 1;
        }
        Ok(())
    }

    fn restore(&mut self) -> io::Result<()> {
        let mut result = Ok(());
        for r in &self.runs[..self.changed] {
            // SAFETY: gives the run back the protection it had; nothing of
            // ours stores into it any more.
            let restored = unsafe { mem::protect(r.start, r.len, r.prot) };
            if result.is_ok() {
                result = restored;
            }
        }
        self.changed = 0;
        result
    }

    fn open_mem(&mut self) -> io::Result<()> {
        // Opened per batch, never cached: after fork a cached descriptor
        // would write into the parent.
        let mem = self.mem.insert(ProcMem::open()?);
        for r in &self.runs {
            for p in (r.start..r.start + r.len).step_by(page_size()) {
                let mut b = [0u8];
                mem.read(p, &mut b)?;
                mem.write(p, &b)?; // same byte: proves writes work here
            }
        }
        Ok(())
    }

    /// Writes `bytes` at `addr`. Allocation-free, errors included.
    pub fn write(&self, addr: usize, bytes: &[u8]) -> io::Result<()> {
        match self.method {
            #[cfg(target_arch = "aarch64")]
            WriteMethod::Mprotect => {
                // SAFETY: as below; an aligned word is one atomic store.
                unsafe { crate::arch::store_code(addr, bytes) };
                crate::arch::sync_icache(addr, bytes.len());
                Ok(())
            }
            #[cfg(target_arch = "x86_64")]
            WriteMethod::Mprotect => {
                for (i, &b) in bytes.iter().enumerate() {
                    // SAFETY: `addr..addr+len` lies in a run made writable in
                    // `prepare` (validated to be mapped). Volatile: the order
                    // of these stores is the protocol.
                    unsafe { ((addr + i) as *mut u8).write_volatile(b) };
                }
                Ok(())
            }
            // Allocation-free, errors included (writes run while threads
            // are parked).
            WriteMethod::ProcMem => match &self.mem {
                Some(mem) => {
                    mem.write(addr, bytes)?;
                    crate::arch::sync_icache(addr, bytes.len());
                    Ok(())
                }
                None => Err(io::ErrorKind::NotConnected.into()),
            },
        }
    }

    /// Restores protections and closes the file.
    pub fn finish(mut self) -> io::Result<()> {
        self.close()
    }

    fn close(&mut self) -> io::Result<()> {
        let r = self.restore();
        self.mem = None;
        r
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// Reads `len` bytes of code at `addr` through `/proc/self/mem` (works for
/// mapped pages whatever their protection).
pub(crate) fn read_code(addr: usize, len: usize) -> io::Result<Vec<u8>> {
    mem::read_vec(addr, len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::bti::Source;

    /// A guarded page keeps PROT_BTI in its run and splits the runs there;
    /// a page outside the guarded ranges never gets it.
    #[test]
    fn runs_carry_the_guard_of_guarded_pages_only() {
        let ps = page_size();
        let maps = Maps::read().unwrap();
        // Three pages of this test binary's code, the middle one "guarded".
        let code = runs_carry_the_guard_of_guarded_pages_only as fn() as usize;
        let m = maps.find(code).unwrap();
        let first = m.start;
        assert!(m.end - m.start >= 3 * ps, "the test binary's text spans 3 pages");
        let guarded = Guarded::from_ranges(vec![(first + ps, first + 2 * ps)], Source::Smaps);
        let runs = page_runs_guarded(&maps, &guarded, [(first, 3 * ps)].into_iter()).unwrap();
        let rx = libc::PROT_READ | libc::PROT_EXEC;
        assert_eq!(
            runs,
            [
                PageRun { start: first, len: ps, prot: rx },
                PageRun { start: first + ps, len: ps, prot: rx | PROT_BTI },
                PageRun { start: first + 2 * ps, len: ps, prot: rx },
            ]
        );
        let none = Guarded::from_ranges(Vec::new(), Source::Unsupported);
        let runs = page_runs_guarded(&maps, &none, [(first, 3 * ps)].into_iter()).unwrap();
        assert_eq!(runs, [PageRun { start: first, len: 3 * ps, prot: rx }]);
    }
}
