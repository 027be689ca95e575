//! The loader: code the hijacked thread runs after the detach, generated
//! here with iced-x86's `code_asm` for each injection.
//!
//! # Image
//!
//! One memfd, mapped `PROT_READ | PROT_EXEC` and never writable (fine
//! under MDWE and systemd's `MemoryDenyWriteExecute`):
//!
//! ```text
//!   page 0   entry (offset 0): the hijacked thread's code
//!            loader_main: the new thread's code
//!            data: libc pointers, descriptors, path, entry name,
//!                  the saved registers and signal mask, the resume recipe
//!   page 1.. the saved XSAVE (or FXSAVE) area, 64-byte aligned as XRSTOR needs
//! ```
//!
//! Everything is addressed `rip`-relative, so nothing depends on where it
//! is mapped; everything the restore reads is in this read-only image, so
//! nothing the loader thread does can disturb it.
//!
//! # The hijacked thread (entry)
//!
//! Entered with `rsp` at the top of the scratch mapping (`≡ 8 mod 16`,
//! as after a CALL), every signal but glibc's 32 and 33 blocked (and but
//! the CPU-time ones, [`CPU_TIME_SIGNALS`], unless the thread must
//! restart a call from its `restart_block`), `DF` clear:
//!
//! 1. `pthread_create(&slot, NULL, loader_main, NULL)` on the scratch
//!    stack, the thread's `errno` saved around it (`__errno_location()`:
//!    `pthread_create` may change it, and the program may be between a
//!    failed call and reading it). Nothing is ever pushed on the thread's own stack, so its red
//!    zone is intact and no assumption about its `rsp` alignment is made.
//!    On failure: a report (status, error number) is sent on the socket
//!    with a raw `sendto(MSG_NOSIGNAL)`, and the four descriptors (socket,
//!    the injector's socket end, both memfds) are closed with raw `close`.
//! 2. **Self-restore** (§4.1 of the design note; none of Frida, kubo or
//!    libpulp does this: all need the tracer to come back, and crash the
//!    target if it died meanwhile). First `errno` is written back, then:
//!    1. `XRSTOR64` of the saved area with `EDX:EAX` = every component
//!       except AMX tile config/data (17, 18) unless they were in use
//!       (`XSTATE_BV`): components in their initial state are
//!       re-initialised (whatever `pthread_create`'s `memset` left in the
//!       vector registers), and an AMX component never touched is not
//!       loaded (it could raise `#NM` under XFD). `FXRSTOR64` on a CPU
//!       without XSAVE.
//!    2. `rt_sigprocmask(SIG_SETMASK, &saved, NULL, 8)`. A signal that
//!       became deliverable runs its handler here, on the scratch stack,
//!       with our state saved and restored by the kernel around it: as
//!       if it had arrived just before the interrupted call.
//!    3. `push [saved rflags]; popfq` (still on scratch), then every
//!       general register with `mov` from the image, `rsp` last.
//!    4. `jmp [resume rip]`: the saved `rip` for user code or a completed
//!       call; `rip - 2` (the `syscall` instruction) with `rax =
//!       orig_rax` for a call the kernel would have restarted, or `rax =
//!       restart_syscall` for `-ERESTART_RESTARTBLOCK`. Re-executing the
//!       `syscall` instruction *is* the kernel's no-handler restart, so a
//!       `nanosleep` continues to its absolute expiry from the thread's
//!       `restart_block`, which nothing here touched.
//!
//! # The new thread (loader_main)
//!
//! Inherits the blocked mask (all but 32/33 and, unless the hijacked
//! thread keeps a `restart_block`, the CPU-time signals), so no program
//! signal handler runs on it but a profiler's ([`CPU_TIME_SIGNALS`]).
//!
//! 0. `rt_sigprocmask(SIG_UNBLOCK, CPU_TIME_SIGNALS)`; `close` the loader's memfd (already mapped) and the injector's end
//!    of the socketpair (the injector holds a duplicate): two remote
//!    calls fewer during the stop. Closing the latter first also makes
//!    the `recv` below see EOF if the injector dies.
//! 1. `recv(sock, &byte, 1, 0)`: wait for the injector's start byte `G`,
//!    sent once the .so is written into its memfd (so that writing it
//!    does not lengthen the hijacked thread's stop). EOF (the injector
//!    died) or anything else: close both descriptors and exit.
//! 2. `h = dlopen("/proc/<nspid>/fd/<memfd>", RTLD_NOW | RTLD_LOCAL)`;
//!    on failure the `dlerror()` text is reported.
//! 3. `f = dlsym(h, entry)`; on failure the `dlerror()` text is reported
//!    and `h` closed.
//! 4. `close(memfd)`; report OK (16 bytes); `pthread_detach(pthread_self())`.
//! 5. `f(sock)`: the entry owns the socket from here. When it returns the
//!    thread exits (it may also call `pthread_exit` itself).
//!
//! # Report
//!
//! 16 bytes, native endian: magic `TPLD`, status, error number, message
//! length; then the message (at most 1024 bytes of `dlerror()` text).

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

use crate::error::LoaderStage;
use crate::linkmap::Calls;
use crate::ptrace::{FpState, Regs};

/// Report magic, `TPLD` as a little-endian `u32`.
pub const REPORT_MAGIC: u32 = u32::from_le_bytes(*b"TPLD");
/// Report status: the entry is about to be called.
pub const STATUS_OK: u32 = 0;
/// Report status: `pthread_create` failed.
pub const STATUS_PTHREAD_CREATE: u32 = 1;
/// Report status: `dlopen` failed.
pub const STATUS_DLOPEN: u32 = 2;
/// Report status: `dlsym` failed.
pub const STATUS_DLSYM: u32 = 3;
/// The byte that lets the loader thread go on with `dlopen`.
pub const START_BYTE: u8 = b'G';
/// Offset of the XSAVE area in the image.
pub const XSAVE_OFFSET: usize = 4096;
/// Longest `dlerror()` text reported.
pub const MAX_MESSAGE: u32 = 1024;

const MSG_NOSIGNAL: i32 = 0x4000;
const SYS_CLOSE: i32 = 3;
const SYS_RT_SIGPROCMASK: i32 = 14;
const SYS_SENDTO: i32 = 44;
const SIG_SETMASK: i32 = 2;
const SIG_UNBLOCK: i32 = 1;
/// The signals the kernel sends the process for the CPU time its threads
/// use (kernel mask bits): `SIGPROF` (`ITIMER_PROF`), `SIGVTALRM`
/// (`ITIMER_VIRTUAL`) and `SIGXCPU` (`RLIMIT_CPU`). Such a signal goes to
/// the thread that was running when the timer expired, unless it blocks
/// it: then to another thread, a sleeping one included, whose `nanosleep`
/// fails with `EINTR` (`complete_signal`, kernel/signal.c). Our threads
/// use the program's CPU time, so they take these (the program's handler
/// runs on them, as on any thread that happens to be running: profilers
/// are written for that).
pub const CPU_TIME_SIGNALS: u64 =
    (1 << (libc::SIGPROF - 1)) | (1 << (libc::SIGVTALRM - 1)) | (1 << (libc::SIGXCPU - 1));
const RTLD_NOW: i32 = 2;
/// AMX `XTILECFG` and `XTILEDATA`.
const AMX_COMPONENTS: u64 = (1 << 17) | (1 << 18);
/// The new thread's frame: report header and message buffer.
const MAIN_FRAME: i32 = 16 + MAX_MESSAGE as i32 + 16;

/// The stage named by a report status.
pub fn stage_of(status: u32) -> LoaderStage {
    match status {
        STATUS_PTHREAD_CREATE => LoaderStage::PthreadCreate,
        STATUS_DLOPEN => LoaderStage::Dlopen,
        STATUS_DLSYM => LoaderStage::Dlsym,
        _ => LoaderStage::Start,
    }
}

/// What is known only at the stop, patched into a [`Template`].
pub struct LoaderInput<'a> {
    /// The target's end of the socketpair.
    pub sock_fd: i32,
    /// The memfd holding the .so.
    pub so_fd: i32,
    /// The loader's own memfd (closed by the loader thread).
    pub loader_fd: i32,
    /// The injector's end of the socketpair, still open in the target
    /// (closed by the loader thread; the injector has its duplicate).
    pub peer_fd: i32,
    /// The path `dlopen` opens (the memfd as the target sees it, or the
    /// object's own path).
    pub path: &'a str,
    /// The saved registers.
    pub regs: &'a Regs,
    /// Where to resume, and with which `rax` (the restart recipe).
    pub resume_rip: u64,
    /// `rax` at resume.
    pub resume_rax: u64,
    /// The saved extended state.
    pub fpstate: &'a FpState,
    /// The saved signal mask.
    pub sigmask: u64,
}

/// Room for the `dlopen` path: `/proc/<pid>/fd/<n>`, or the object's own
/// path ([`crate::SoImage::TargetPath`]).
pub const PATH_ROOM: usize = 512;

/// The data slots of the image, in order.
const SLOTS: [&str; 35] = [
    "pthread_create",
    "pthread_detach",
    "pthread_self",
    "dlopen",
    "dlsym",
    "dlerror",
    "dlclose",
    "close",
    "send",
    "recv",
    "errno_location",
    "sock",
    "so_fd",
    "loader_fd",
    "peer_fd",
    "rfbm",
    "sigmask",
    "rflags",
    "rax",
    "rbx",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "rbp",
    "r8",
    "r9",
    "r10",
    "r11",
    "r12",
    "r13",
    "r14",
    "r15",
    "rsp",
    "rip",
];

/// The loader assembled ahead of the stop: code and data page with every
/// value known only at the stop left as a slot, filled by
/// [`Template::fill`] in microseconds (assembling takes about half a
/// millisecond, too long to hold a thread stopped for).
#[derive(Debug, Clone)]
pub struct Template {
    page: Vec<u8>,
    slots: std::collections::BTreeMap<&'static str, usize>,
    path: usize,
    xsave: bool,
    calls: Calls,
    entry: String,
}

/// The requested-feature bitmap for `XRSTOR` (see the module doc, 2.1).
pub fn xrstor_mask(fp: &FpState) -> u64 {
    !AMX_COMPONENTS | (fp.xstate_bv() & AMX_COMPONENTS)
}

impl Template {
    /// Assembles the loader for these libc functions and `entry` symbol;
    /// `xsave`: the state is restored with `XRSTOR64` (else `FXRSTOR64`).
    pub fn build(calls: &Calls, entry: &str, xsave: bool) -> Result<Template, String> {
        build(calls, entry, xsave).map_err(|e| e.to_string())
    }

    /// The same loader for the other kind of extended state.
    pub fn rebuilt(&self, xsave: bool) -> Result<Template, String> {
        Template::build(&self.calls, &self.entry, xsave)
    }

    /// Does it restore with `XRSTOR64`?
    pub fn xsave(&self) -> bool {
        self.xsave
    }

    /// The image for one injection: the page with its slots filled, then
    /// the saved extended state at [`XSAVE_OFFSET`]; its entry is at
    /// offset 0. Panics if `input.fpstate` is not of the template's kind
    /// or the path does not fit (both checked by the caller).
    pub fn fill(&self, input: &LoaderInput<'_>) -> Vec<u8> {
        assert_eq!(matches!(input.fpstate, FpState::Xsave(_)), self.xsave, "extended-state kind");
        assert!(input.path.len() < PATH_ROOM, "path {:?} too long", input.path);
        let r = input.regs;
        let mut image = self.page.clone();
        let mut put = |name: &str, value: u64| {
            let at = self.slots[name];
            image[at..at + 8].copy_from_slice(&value.to_le_bytes());
        };
        put("sock", input.sock_fd as u32 as u64);
        put("so_fd", input.so_fd as u32 as u64);
        put("loader_fd", input.loader_fd as u32 as u64);
        put("peer_fd", input.peer_fd as u32 as u64);
        put("rfbm", xrstor_mask(input.fpstate));
        put("sigmask", input.sigmask);
        put("rflags", r.eflags);
        put("rax", input.resume_rax);
        put("rbx", r.rbx);
        put("rcx", r.rcx);
        put("rdx", r.rdx);
        put("rsi", r.rsi);
        put("rdi", r.rdi);
        put("rbp", r.rbp);
        put("r8", r.r8);
        put("r9", r.r9);
        put("r10", r.r10);
        put("r11", r.r11);
        put("r12", r.r12);
        put("r13", r.r13);
        put("r14", r.r14);
        put("r15", r.r15);
        put("rsp", r.rsp);
        put("rip", input.resume_rip);
        image[self.path..self.path + input.path.len()].copy_from_slice(input.path.as_bytes());
        image[self.path + input.path.len()] = 0;
        image.extend_from_slice(input.fpstate.bytes());
        image.resize(image.len().next_multiple_of(4096), 0);
        image
    }
}

fn build(calls: &Calls, entry: &str, xsave: bool) -> Result<Template, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut base = a.create_label();
    let mut restore = a.create_label();
    let mut loader_main = a.create_label();
    // Data labels.
    let mut d = std::collections::BTreeMap::new();
    for name in SLOTS.iter().chain(&["path", "entry"]) {
        d.insert(*name, a.create_label());
    }
    let l = |name: &str| d[name];

    // ---- the hijacked thread ----
    a.set_label(&mut base)?;
    // 1. pthread_create on the scratch stack, one slot for the pthread_t;
    // the thread's errno (TLS memory, not a register) kept in r12/r13.
    a.and(rsp, -16)?;
    a.sub(rsp, 16)?;
    a.call(qword_ptr(l("errno_location")))?;
    a.mov(r12, rax)?;
    a.mov(r13d, dword_ptr(rax))?;
    a.mov(rdi, rsp)?;
    a.xor(esi, esi)?;
    a.lea(rdx, ptr(loader_main))?;
    a.xor(ecx, ecx)?;
    a.call(qword_ptr(l("pthread_create")))?;
    a.test(eax, eax)?;
    a.jz(restore)?;
    // Failed: report it with raw system calls (no libc state assumed).
    a.mov(dword_ptr(rsp), REPORT_MAGIC as i32)?;
    a.mov(dword_ptr(rsp + 4), STATUS_PTHREAD_CREATE as i32)?;
    a.mov(dword_ptr(rsp + 8), eax)?;
    a.mov(dword_ptr(rsp + 12), 0)?;
    a.mov(eax, SYS_SENDTO)?;
    a.mov(edi, dword_ptr(l("sock")))?;
    a.mov(rsi, rsp)?;
    a.mov(edx, 16)?;
    a.mov(r10d, MSG_NOSIGNAL)?;
    a.xor(r8d, r8d)?;
    a.xor(r9d, r9d)?;
    a.syscall()?;
    a.mov(eax, SYS_CLOSE)?;
    a.mov(edi, dword_ptr(l("sock")))?;
    a.syscall()?;
    for fd in ["so_fd", "loader_fd", "peer_fd"] {
        a.mov(eax, SYS_CLOSE)?;
        a.mov(edi, dword_ptr(l(fd)))?;
        a.syscall()?;
    }

    // 2. Self-restore.
    a.set_label(&mut restore)?;
    // 2.0 errno.
    a.mov(dword_ptr(r12), r13d)?;
    // 2.1 Extended state.
    a.lea(rbx, ptr(base))?;
    if xsave {
        a.mov(rax, qword_ptr(l("rfbm")))?;
        a.mov(rdx, rax)?;
        a.shr(rdx, 32)?;
        a.xrstor64(ptr(rbx + XSAVE_OFFSET as i32))?;
    } else {
        a.fxrstor64(ptr(rbx + XSAVE_OFFSET as i32))?;
    }
    // 2.2 Signal mask.
    a.mov(eax, SYS_RT_SIGPROCMASK)?;
    a.mov(edi, SIG_SETMASK)?;
    a.lea(rsi, ptr(l("sigmask")))?;
    a.xor(edx, edx)?;
    a.mov(r10d, 8)?;
    a.syscall()?;
    // 2.3 Flags (on the scratch stack), then the registers, rsp last.
    a.push(qword_ptr(l("rflags")))?;
    a.popfq()?;
    a.mov(rax, qword_ptr(l("rax")))?;
    a.mov(rbx, qword_ptr(l("rbx")))?;
    a.mov(rcx, qword_ptr(l("rcx")))?;
    a.mov(rdx, qword_ptr(l("rdx")))?;
    a.mov(rsi, qword_ptr(l("rsi")))?;
    a.mov(rdi, qword_ptr(l("rdi")))?;
    a.mov(rbp, qword_ptr(l("rbp")))?;
    a.mov(r8, qword_ptr(l("r8")))?;
    a.mov(r9, qword_ptr(l("r9")))?;
    a.mov(r10, qword_ptr(l("r10")))?;
    a.mov(r11, qword_ptr(l("r11")))?;
    a.mov(r12, qword_ptr(l("r12")))?;
    a.mov(r13, qword_ptr(l("r13")))?;
    a.mov(r14, qword_ptr(l("r14")))?;
    a.mov(r15, qword_ptr(l("r15")))?;
    a.mov(rsp, qword_ptr(l("rsp")))?;
    // 2.4 Resume (the restart recipe is in `rip` and `rax`).
    a.jmp(qword_ptr(l("rip")))?;

    // ---- the new thread ----
    let mut dlopen_failed = a.create_label();
    let mut dlsym_failed = a.create_label();
    let mut fail = a.create_label();
    let mut copy = a.create_label();
    let mut copied = a.create_label();
    let mut no_dlclose = a.create_label();
    let mut abort = a.create_label();
    let mut out = a.create_label();
    let msg_nosignal = MSG_NOSIGNAL;
    a.set_label(&mut loader_main)?;
    a.push(rbx)?;
    a.push(r12)?;
    a.push(r13)?;
    a.sub(rsp, MAIN_FRAME)?; // rsp ≡ 0 mod 16 here and at every call
                             // 0. Take the CPU-time signals (blocked when the hijacked thread must
                             // keep its restart_block, and inherited so): `rt_sigprocmask(
                             // SIG_UNBLOCK, [rsp], NULL, 8)`, the set in the frame's first word.
    a.mov(qword_ptr(rsp), CPU_TIME_SIGNALS as i32)?;
    a.mov(eax, SYS_RT_SIGPROCMASK)?;
    a.mov(edi, SIG_UNBLOCK)?;
    a.mov(rsi, rsp)?;
    a.xor(edx, edx)?;
    a.mov(r10d, 8)?;
    a.syscall()?;
    // Then close what the hijacked thread could not wait for: the loader
    // memfd (mapped) and the injector's socket end (duplicated).
    a.mov(edi, dword_ptr(l("loader_fd")))?;
    a.call(qword_ptr(l("close")))?;
    a.mov(edi, dword_ptr(l("peer_fd")))?;
    a.call(qword_ptr(l("close")))?;
    // 1. The start byte.
    a.mov(edi, dword_ptr(l("sock")))?;
    a.mov(rsi, rsp)?;
    a.mov(edx, 1)?;
    a.xor(ecx, ecx)?;
    a.call(qword_ptr(l("recv")))?;
    a.cmp(rax, 1)?;
    a.jne(abort)?;
    a.cmp(byte_ptr(rsp), START_BYTE as i32)?;
    a.jne(abort)?;
    // 2. dlopen.
    a.lea(rdi, ptr(l("path")))?;
    a.mov(esi, RTLD_NOW)?;
    a.call(qword_ptr(l("dlopen")))?;
    a.test(rax, rax)?;
    a.jz(dlopen_failed)?;
    a.mov(rbx, rax)?;
    // 3. dlsym.
    a.mov(rdi, rbx)?;
    a.lea(rsi, ptr(l("entry")))?;
    a.call(qword_ptr(l("dlsym")))?;
    a.test(rax, rax)?;
    a.jz(dlsym_failed)?;
    a.mov(r12, rax)?;
    // 4. Close the memfd, report OK, detach ourselves.
    a.mov(edi, dword_ptr(l("so_fd")))?;
    a.call(qword_ptr(l("close")))?;
    a.mov(dword_ptr(rsp), REPORT_MAGIC as i32)?;
    a.mov(dword_ptr(rsp + 4), STATUS_OK as i32)?;
    a.mov(qword_ptr(rsp + 8), 0)?;
    a.mov(edi, dword_ptr(l("sock")))?;
    a.mov(rsi, rsp)?;
    a.mov(edx, 16)?;
    a.mov(ecx, msg_nosignal)?;
    a.call(qword_ptr(l("send")))?;
    a.call(qword_ptr(l("pthread_self")))?;
    a.mov(rdi, rax)?;
    a.call(qword_ptr(l("pthread_detach")))?;
    // 5. The entry, with the socket.
    a.mov(edi, dword_ptr(l("sock")))?;
    a.call(r12)?;
    a.jmp(out)?;

    a.set_label(&mut dlsym_failed)?;
    a.mov(r13d, STATUS_DLSYM as i32)?;
    a.jmp(fail)?;
    a.set_label(&mut dlopen_failed)?;
    a.mov(r13d, STATUS_DLOPEN as i32)?;
    a.xor(ebx, ebx)?;
    // Report the dlerror() text (copied before any dlclose).
    a.set_label(&mut fail)?;
    a.call(qword_ptr(l("dlerror")))?;
    a.xor(ecx, ecx)?;
    a.test(rax, rax)?;
    a.jz(copied)?;
    a.set_label(&mut copy)?;
    a.cmp(ecx, MAX_MESSAGE as i32)?;
    a.jae(copied)?;
    a.movzx(edx, byte_ptr(rax + rcx))?;
    a.test(edx, edx)?;
    a.jz(copied)?;
    a.mov(byte_ptr(rsp + rcx + 16), dl)?;
    a.inc(ecx)?;
    a.jmp(copy)?;
    a.set_label(&mut copied)?;
    a.mov(dword_ptr(rsp), REPORT_MAGIC as i32)?;
    a.mov(dword_ptr(rsp + 4), r13d)?;
    a.mov(dword_ptr(rsp + 8), 0)?;
    a.mov(dword_ptr(rsp + 12), ecx)?;
    a.mov(r12d, ecx)?;
    a.test(rbx, rbx)?;
    a.jz(no_dlclose)?;
    a.mov(rdi, rbx)?;
    a.call(qword_ptr(l("dlclose")))?;
    a.set_label(&mut no_dlclose)?;
    a.mov(edi, dword_ptr(l("sock")))?;
    a.mov(rsi, rsp)?;
    a.lea(edx, ptr(r12 + 16))?;
    a.mov(ecx, msg_nosignal)?;
    a.call(qword_ptr(l("send")))?;
    // Give up: close both descriptors, detach, exit.
    a.set_label(&mut abort)?;
    a.mov(edi, dword_ptr(l("sock")))?;
    a.call(qword_ptr(l("close")))?;
    a.mov(edi, dword_ptr(l("so_fd")))?;
    a.call(qword_ptr(l("close")))?;
    a.call(qword_ptr(l("pthread_self")))?;
    a.mov(rdi, rax)?;
    a.call(qword_ptr(l("pthread_detach")))?;
    a.set_label(&mut out)?;
    a.add(rsp, MAIN_FRAME)?;
    a.pop(r13)?;
    a.pop(r12)?;
    a.pop(rbx)?;
    a.xor(eax, eax)?;
    a.ret()?;

    // ---- data ----
    let c = calls;
    let known: [(&str, u64); 11] = [
        ("pthread_create", c.pthread_create),
        ("pthread_detach", c.pthread_detach),
        ("pthread_self", c.pthread_self),
        ("dlopen", c.dlopen),
        ("dlsym", c.dlsym),
        ("dlerror", c.dlerror),
        ("dlclose", c.dlclose),
        ("close", c.close),
        ("send", c.send),
        ("recv", c.recv),
        ("errno_location", c.errno_location),
    ];
    let mut placed = Vec::new();
    for name in SLOTS {
        let mut label = d[name];
        a.set_label(&mut label)?;
        a.dq(&[known.iter().find(|k| k.0 == name).map_or(0, |k| k.1)])?;
        placed.push((name, label));
    }
    let mut path_label = d["path"];
    a.set_label(&mut path_label)?;
    a.db(&[0u8; PATH_ROOM])?;
    let mut entry_label = d["entry"];
    a.set_label(&mut entry_label)?;
    let mut bytes = entry.as_bytes().to_vec();
    bytes.push(0);
    a.db(&bytes)?;

    let out = a.assemble_options(0, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let mut slots = std::collections::BTreeMap::new();
    for (name, label) in placed {
        slots.insert(name, out.label_ip(&label)? as usize);
    }
    let path = out.label_ip(&path_label)? as usize;
    let mut page = out.inner.code_buffer;
    assert!(page.len() <= XSAVE_OFFSET, "loader code and data outgrew their page ({} bytes)", page.len());
    page.resize(XSAVE_OFFSET, 0xcc);
    Ok(Template { page, slots, path, xsave, calls: *calls, entry: entry.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Code, Decoder, DecoderOptions, Mnemonic};

    fn input<'a>(regs: &'a Regs, fp: &'a FpState) -> LoaderInput<'a> {
        LoaderInput {
            sock_fd: 7,
            so_fd: 8,
            loader_fd: 5,
            peer_fd: 6,
            path: "/proc/123/fd/8",
            regs,
            resume_rip: 0x1234_5678,
            resume_rax: 230,
            fpstate: fp,
            sigmask: 0x8000,
        }
    }

    #[test]
    fn image_has_code_data_and_xsave_where_expected() {
        // SAFETY: plain integers; all-zero is a valid value.
        let mut regs: Regs = unsafe { std::mem::zeroed() };
        regs.rsp = 0x7fff_0000;
        regs.r15 = 0x1515_1515_1515_1515;
        let calls = Calls { pthread_create: 0x1111, ..Calls::default() };
        let mut xsave = vec![0u8; 2688];
        xsave[512] = 0x07; // XSTATE_BV: x87, SSE, AVX
        xsave[600] = 0xab;
        let fp = FpState::Xsave(xsave.clone());
        let template = Template::build(&calls, "hello_entry", true).unwrap();
        let image = template.fill(&input(&regs, &fp));
        assert_eq!(image.len() % 4096, 0);
        assert_eq!(&image[XSAVE_OFFSET..XSAVE_OFFSET + xsave.len()], &xsave[..]);
        let find = |needle: &[u8]| image.windows(needle.len()).position(|w| w == needle);
        assert!(find(b"/proc/123/fd/8\0").is_some());
        assert!(find(&0x1111u64.to_le_bytes()).is_some(), "the pthread_create pointer");
        assert!(find(b"hello_entry\0").is_some());
        assert!(find(&0x1515_1515_1515_1515u64.to_le_bytes()).is_some());
        assert!(find(&0x1234_5678u64.to_le_bytes()).is_some());

        // The code decodes, the restore has XRSTOR64, rt_sigprocmask and an
        // indirect JMP, and nothing writes to the stack after `mov rsp`.
        let mut dec = Decoder::with_ip(64, &image[..XSAVE_OFFSET], 0, DecoderOptions::NONE);
        let insns: Vec<_> = dec.iter().take_while(|i| i.code() != Code::INVALID).collect();
        assert!(insns.iter().any(|i| i.mnemonic() == Mnemonic::Xrstor64));
        let mov_rsp = insns
            .iter()
            .position(|i| i.mnemonic() == Mnemonic::Mov && i.op0_register() == iced_x86::Register::RSP)
            .unwrap();
        assert_eq!(insns[mov_rsp + 1].mnemonic(), Mnemonic::Jmp);
        assert!(insns[mov_rsp + 1].is_ip_rel_memory_operand());
        // The rip-relative jump reads the resume address.
        let target = insns[mov_rsp + 1].ip_rel_memory_address() as usize;
        assert_eq!(u64::from_le_bytes(image[target..target + 8].try_into().unwrap()), 0x1234_5678);
    }

    #[test]
    fn xrstor_mask_keeps_amx_out_unless_in_use() {
        let mut x = vec![0u8; 1024];
        assert_eq!(xrstor_mask(&FpState::Xsave(x.clone())) & AMX_COMPONENTS, 0);
        assert_eq!(xrstor_mask(&FpState::Xsave(x.clone())) & 0x2e7, 0x2e7);
        x[514] = 0x06; // bits 17 and 18
        assert_eq!(xrstor_mask(&FpState::Xsave(x)) & AMX_COMPONENTS, AMX_COMPONENTS);
    }
}
