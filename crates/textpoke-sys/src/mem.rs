//! This process's own memory: page protection (`mprotect`, and whether
//! the process refuses writable-and-executable pages), the memory file
//! `/proc/self/mem`, and copies that cannot fault (`process_vm_readv`).
//!
//! # `/proc/self/mem`
//!
//! A write to `/proc/self/mem` goes through the kernel with `FOLL_FORCE`:
//! it reaches a page whatever its protection, and changes none. That is
//! how code is written in a process that refuses writable-and-executable
//! pages (`PR_MDWE_REFUSE_EXEC_GAIN`), and how trampoline blocks, mapped
//! readable and executable and never writable, get their code. A
//! [`ProcMem`] is opened for a unit of work and closed after it, never
//! cached: after `fork` a cached descriptor would still name the parent's
//! memory. Its writes and reads allocate nothing, errors included, so they
//! may run while other threads are parked holding malloc's lock.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The size of a page.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// The machine's physical memory in bytes (`sysconf(_SC_PHYS_PAGES)`
/// times the page size; 0 when the system does not say).
pub fn physical_memory() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    (pages.max(0) as u64).saturating_mul(size.max(0) as u64)
}

/// Whether `prctl(PR_GET_MDWE)` reports `PR_MDWE_REFUSE_EXEC_GAIN`: no page
/// of this process may become writable and executable.
pub fn mdwe_refuses_exec_gain() -> bool {
    // SAFETY: PR_GET_MDWE takes no pointers; unused arguments must be 0.
    let r = unsafe { libc::prctl(libc::PR_GET_MDWE, 0, 0, 0, 0) };
    r > 0 && (r as libc::c_uint & libc::PR_MDWE_REFUSE_EXEC_GAIN) != 0
}

/// Sets the protection of the pages `[addr, addr + len)` to `prot`
/// (`PROT_*` bits).
///
/// # Safety
///
/// The range must be mapped and page-aligned, and no code of this process
/// may rely on an access `prot` takes away (a thread running those pages
/// needs `PROT_EXEC` kept; a thread storing into them, `PROT_WRITE`).
pub unsafe fn protect(addr: usize, len: usize, prot: libc::c_int) -> io::Result<()> {
    // SAFETY: the caller's guarantee.
    if unsafe { libc::mprotect(addr as *mut libc::c_void, len, prot) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `/proc/self/mem`, open for reading and writing (see the module docs).
#[derive(Debug)]
pub struct ProcMem {
    fd: OwnedFd,
}

impl ProcMem {
    /// Opens `/proc/self/mem` (close-on-exec).
    pub fn open() -> io::Result<ProcMem> {
        const PATH: &[u8] = b"/proc/self/mem\0";
        // SAFETY: a NUL-terminated path.
        let fd = unsafe { libc::open(PATH.as_ptr().cast(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just opened, owned by nobody else.
        Ok(ProcMem { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Writes `bytes` at `addr` in one `pwrite`, whatever the page's
    /// protection. A short write is an error of kind `WriteZero`.
    /// Allocation-free, errors included.
    pub fn write(&self, addr: usize, bytes: &[u8]) -> io::Result<()> {
        // SAFETY: `bytes` is valid for reads; the kernel checks `addr`.
        let n = unsafe { libc::pwrite(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), addr as libc::off_t) };
        match n {
            n if n == bytes.len() as isize => Ok(()),
            -1 => Err(io::Error::last_os_error()),
            // An error of a kind only, which does not allocate.
            _ => Err(io::ErrorKind::WriteZero.into()),
        }
    }

    /// Writes all of `bytes` at `addr`, in as many `pwrite`s as the kernel
    /// needs (it stops early only at an unmapped page: then an error).
    pub fn write_all(&self, addr: usize, bytes: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < bytes.len() {
            let rest = &bytes[done..];
            // SAFETY: `rest` is valid for reads; the kernel checks the address.
            let n = unsafe {
                libc::pwrite(self.fd.as_raw_fd(), rest.as_ptr().cast(), rest.len(), (addr + done) as libc::off_t)
            };
            match n {
                -1 if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
                -1 => return Err(io::Error::last_os_error()),
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => done += n as usize,
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `addr` in one `pread`, whatever the
    /// page's protection. Allocation-free, errors included.
    pub fn read(&self, addr: usize, buf: &mut [u8]) -> io::Result<()> {
        // SAFETY: `buf` is valid for writes; the kernel checks `addr`.
        let n = unsafe { libc::pread(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), addr as libc::off_t) };
        match n {
            n if n == buf.len() as isize => Ok(()),
            -1 => Err(io::Error::last_os_error()),
            _ => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// Reads `len` bytes at `addr` through `/proc/self/mem` (opened for
/// reading only): works for mapped pages whatever their protection, fails
/// where nothing is mapped.
pub fn read_vec(addr: usize, len: usize) -> io::Result<Vec<u8>> {
    let f = std::fs::File::open("/proc/self/mem")?;
    let mut buf = vec![0u8; len];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, addr as u64)?;
    Ok(buf)
}

/// Copies memory of this process at `addr` into `buf` without faulting
/// (`process_vm_readv` on ourselves); returns how many bytes it could copy
/// (0 if `addr` is unmapped). Allocation-free, async-signal-safe.
pub fn read_memory(addr: usize, buf: &mut [u8]) -> usize {
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: addr as *mut _, iov_len: buf.len() };
    // SAFETY: `local` describes our writable buffer; the kernel checks
    // `remote` and stops at the first unmapped page instead of faulting.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    n.max(0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn physical_memory_is_at_least_a_page() {
        let total = physical_memory();
        assert!(total >= page_size() as u64 && total.is_multiple_of(page_size() as u64), "{total}");
    }

    #[test]
    fn proc_mem_reads_and_writes_read_only_pages() {
        let ps = page_size();
        let p = super::super::anon::map(ps).unwrap();
        let addr = p as usize;
        // SAFETY: our own fresh mapping, which nothing else uses.
        unsafe { protect(addr, ps, libc::PROT_READ) }.unwrap();
        let mem = ProcMem::open().unwrap();
        mem.write(addr + 10, &[1, 2, 3]).unwrap();
        mem.write_all(addr + ps - 2, &[7, 8]).unwrap();
        let mut back = [0u8; 4];
        mem.read(addr + 9, &mut back).unwrap();
        assert_eq!(back, [0, 1, 2, 3]);
        assert_eq!(read_vec(addr + 10, 2).unwrap(), [1, 2]);
        assert_eq!(read_vec(addr + ps - 2, 2).unwrap(), [7, 8]);
        let mut copy = [0u8; 3];
        assert_eq!(read_memory(addr + 10, &mut copy), 3);
        assert_eq!(copy, [1, 2, 3]);
        // SAFETY: ours; nothing uses it any more.
        unsafe { super::super::anon::unmap(p, ps) };
        assert!(mem.write(addr, &[1]).is_err(), "unmapped now");
        assert!(mem.write_all(addr, &[1]).is_err(), "unmapped now");
        assert_eq!(read_memory(addr, &mut copy), 0);
    }
}
