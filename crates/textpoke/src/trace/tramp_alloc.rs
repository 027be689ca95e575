//! Trampoline and stub memory: blocks of trampolines shared by every site
//! (allocated, generated with `arch::tramp`, retired once no stub word
//! points into them), the stubs of each site's object, the never-freed
//! routines and return blocks, and the stub words that lead to a
//! trampoline.

use super::hot::{self, SitePlace, MAX_OPS};
use super::reclaim::Retired;
use super::state::{Inner, Stub, StubKind, Target};
use super::{unwind, EmitFn, TraceError};
use crate::arch::{self, tramp};
use crate::sites::ObjectId;
use crate::text::codemem::{CodeBlock, DataBlock};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Where the words of a change's stub must point: a trampoline in block
/// `block`, reached from the site through the stub at `stub`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Wire {
    pub(super) block: usize,
    pub(super) tramp: usize,
    pub(super) stub: usize,
}

/// Stubs of one object: code within rel32 reach of its sites, data (the
/// words) within reach of the code. Never freed while the object is
/// loaded.
pub(super) struct StubBlock {
    pub(super) code: CodeBlock,
    pub(super) data: DataBlock,
    pub(super) object: ObjectId,
    /// Slots handed out (slot 0 of the data is the header).
    pub(super) used: usize,
}

/// Trampolines shared by every site. Retired once no stub's word points
/// into it.
pub(super) struct TrampBlock {
    pub(super) code: CodeBlock,
    pub(super) used: usize,
    /// Trampolines for function-entry sites [0] and body sites [1].
    pub(super) list: [Option<usize>; 2],
    pub(super) direct: [[Option<usize>; MAX_OPS]; 2],
    /// Count trampolines, per op (each with its slow path).
    pub(super) count: [Option<usize>; MAX_OPS],
    /// Graph trampolines, per op (their slow paths are `direct[0][op]`).
    pub(super) graph: [Option<usize>; MAX_OPS],
    /// Stub words pointing into the block.
    pub(super) users: usize,
}

/// Trampoline blocks: 64 KiB of address space each, two or three pages
/// touched.
const BLOCK_BYTES: usize = 64 << 10;
/// Room for a graph trampoline.
const GRAPH_TRAMP_BYTES: usize = 512;
/// Stub blocks: code and data for this many stubs (slot 0 is the header).
const STUBS_PER_BLOCK: usize = 1024;

/// The never-freed routines stubs call through their block's header.
pub(super) struct Routines {
    /// `arch::tramp::HDR_CALL`, `HDR_GRAPH`, `HDR_LEAVE`.
    pub(super) header: [usize; 3],
    pub(super) _code: CodeBlock,
}

/// The graph code the graph return block was made with, and the block.
pub(super) struct GraphCode {
    pub(super) entry: EmitFn,
    pub(super) exit: EmitFn,
    pub(super) shadow: tramp::ShadowOffsets,
    /// Starts with the thunk graph trampolines jump to; never freed.
    pub(super) block: CodeBlock,
}

/// A call stub for the site at `site`: x86-64 sites `call` it; aarch64
/// sites branch to it, and it branches back past the pad (function
/// entries, `arch/tramp_aarch64.rs`) or past the site with every register
/// as it was (body sites, `arch/aarch64/body_stub.rs`).
fn call_stub(
    at: usize,
    data: usize,
    header: usize,
    value: u32,
    c: tramp::Counter,
    (site, place): (usize, SitePlace),
) -> Option<tramp::StubCode> {
    #[cfg(target_arch = "x86_64")]
    let _ = (site, place);
    #[cfg(target_arch = "x86_64")]
    return tramp::call_stub(at, data, header, value, c);
    #[cfg(target_arch = "aarch64")]
    return match place {
        SitePlace::FunctionEntry => tramp::call_stub(at, data, header, value, c, tramp::Entered::Branch { site }),
        SitePlace::BodyEntry | SitePlace::BodyExit => arch::body_stub::body_stub(at, data, header, value, c, site),
    };
}

/// Maps stub code within reach of every address in `[lo, addr]`, as near
/// the site `addr` as can be: rel32 on x86-64 (`CodeBlock`'s reach); on
/// aarch64 a `b` reaches ±128 MiB only, so a block farther than that is
/// given back and another place tried.
fn stub_code_near(lo: usize, addr: usize, len: usize) -> std::io::Result<CodeBlock> {
    let reaches = |b: &CodeBlock| {
        let last = b.addr() + b.len() - arch::REL32_LEN;
        [lo, addr].iter().all(|&s| arch::encode_jmp(s, b.addr()).is_some() && arch::encode_jmp(s, last).is_some())
    };
    retry_elsewhere(|k| {
        let step = k * (16 << 20);
        let prefer = if k % 2 == 1 { addr.wrapping_sub(step) } else { addr.wrapping_add(step) };
        let b = CodeBlock::near_preferring(lo, addr, prefer, len)?;
        if reaches(&b) {
            Ok(b)
        } else {
            Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "no free gap within a branch's reach"))
        }
    })
}

/// `map(0)`, and on aarch64 `map(1)`, `map(2)`... while it fails with
/// `AddrInUse`: under qemu-user the guest's `/proc/self/maps` does not
/// show qemu's own host mappings, so a gap that looks free may not be
/// (`MAP_FIXED_NOREPLACE` then lands elsewhere); a real kernel reports
/// `EEXIST`, which `codemem` retries itself. `map(k)` looks elsewhere for
/// `k > 0`.
fn retry_elsewhere<T>(mut map: impl FnMut(usize) -> std::io::Result<T>) -> std::io::Result<T> {
    let mut r = map(0);
    let tries = if cfg!(target_arch = "aarch64") { 8 } else { 0 };
    for k in 1..=tries {
        match &r {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => r = map(k),
            _ => break,
        }
    }
    r
}

impl Inner {
    pub(super) fn ensure_return_trampoline(&mut self) -> Result<(), TraceError> {
        if self.return_block.is_some() {
            return Ok(());
        }
        let here = Self::ensure_return_trampoline as *const () as usize;
        let block =
            CodeBlock::near(here, here, 4096).map_err(|source| TraceError::TrampolineMemory { near: here, source })?;
        let code = tramp::return_block(block.addr(), hot::on_return as *const () as usize, self.avx, None)
            .map_err(|e| TraceError::CodeGen(e.to_string()))?;
        block.write(0, &code).map_err(|source| TraceError::TrampolineMemory { near: here, source })?;
        // Exceptions must unwind through replaced return addresses.
        let mut hooks = unwind::UnwindHooks::default();
        hooks.install();
        self.unwind = Some(hooks);
        // Release pairs with the Acquire loads in `hot::function_entry` and
        // `hot::rehijack_after_catch`: the block's code is written before
        // (a fresh mapping, which no core has executed).
        hot::RETURN_TRAMPOLINE.store(block.addr() + tramp::RETURN_OFFSET, Ordering::Release);
        self.return_block = Some(block); // never freed: shadow stacks point into it
        Ok(())
    }

    /// Makes the graph return block for the first graph code registered:
    /// a return trampoline whose fast path runs `exit`, preceded by the
    /// thunk graph trampolines jump to. Nothing if the shadow stack's
    /// layout is not known (its thread-local is not in static TLS) or a
    /// block exists already (for other code, the op is then called).
    pub(super) fn ensure_graph_block(&mut self, entry: EmitFn, exit: EmitFn) -> Result<(), TraceError> {
        let Some(sh) = hot::shadow_offsets() else { return Ok(()) };
        if self.graph_code.is_some() {
            return Ok(());
        }
        let here = Self::ensure_graph_block as *const () as usize;
        let block =
            CodeBlock::near(here, here, 4096).map_err(|source| TraceError::TrampolineMemory { near: here, source })?;
        let fast: tramp::Emit<'_> = &exit;
        let code = tramp::return_block(block.addr(), hot::on_return as *const () as usize, self.avx, Some((&sh, fast)))
            .map_err(|e| TraceError::CodeGen(e.to_string()))?;
        block.write(0, &code).map_err(|source| TraceError::TrampolineMemory { near: here, source })?;
        // Its return trampoline handles any shadow entry (the fast path
        // checks the entry's op, else calls the handler): the hot path's
        // entries return through it too from now on, so that a call the
        // graph trampoline handed to the hot path (the thread's first, a
        // segment change) still returns inline. The plain block stays for
        // the entries made before. Release: partner as in
        // `ensure_return_trampoline`.
        hot::RETURN_TRAMPOLINE.store(block.addr() + tramp::RETURN_OFFSET, Ordering::Release);
        self.graph_code = Some(GraphCode { entry, exit, shadow: sh, block });
        Ok(())
    }

    /// Bump-allocates `len` bytes of code in block `b`.
    fn alloc_in(&mut self, b: usize, len: usize) -> Option<usize> {
        let blk = self.blocks[b].as_mut()?;
        let off = blk.used.next_multiple_of(16);
        (off + len <= blk.code.len()).then(|| {
            blk.used = off + len;
            blk.code.addr() + off
        })
    }

    /// A new trampoline block; its index (a retired block's is reused).
    fn new_block(&mut self) -> Result<usize, TraceError> {
        // Near the graph return block, whose thunk graph trampolines jump to
        // (rel32; iced makes it an indirect jump when out of reach), else
        // near the tracer's code.
        let near = match &self.graph_code {
            Some(g) => g.block.addr(),
            None => Self::new_block as *const () as usize,
        };
        let code =
            CodeBlock::near(near, near, BLOCK_BYTES).map_err(|source| TraceError::TrampolineMemory { near, source })?;
        let blk = TrampBlock {
            code,
            used: 0,
            list: [None; 2],
            direct: [[None; MAX_OPS]; 2],
            count: [None; MAX_OPS],
            graph: [None; MAX_OPS],
            users: 0,
        };
        match self.blocks.iter().position(Option::is_none) {
            Some(b) => {
                self.blocks[b] = Some(blk);
                Ok(b)
            }
            None => {
                self.blocks.push(Some(blk));
                Ok(self.blocks.len() - 1)
            }
        }
    }

    /// Writes `code` made for address `at` into block `b`.
    fn put_code(&mut self, b: usize, at: usize, code: &[u8]) -> Result<(), TraceError> {
        let cb = &self.blocks[b].as_ref().expect("live block").code;
        cb.write(at - cb.addr(), code).map_err(|source| TraceError::TrampolineMemory { near: at, source })?;
        self.fresh_code = true;
        Ok(())
    }

    /// Op `op`'s count trampoline in block `b` (and its slow path).
    fn count_trampoline_in(&mut self, b: usize, op: usize) -> Result<Option<usize>, TraceError> {
        if let Some(t) = self.blocks[b].as_ref().expect("live block").count[op] {
            return Ok(Some(t));
        }
        let count = self.count_code(op).expect("Target::Count only for an op with count code");
        let (Some(slow), Some(at)) = (self.alloc_in(b, 1024), self.alloc_in(b, 256)) else { return Ok(None) };
        let handler = hot::on_count_slow as *const () as usize;
        let code = tramp::entry_trampoline(slow, handler, op, self.avx, tramp::Live::Body)
            .map_err(|e| TraceError::CodeGen(e.to_string()))?;
        self.put_code(b, slow, &code)?;
        let emit: tramp::Emit<'_> = &count;
        let code = tramp::count_trampoline(at, emit, slow).map_err(|e| TraceError::CodeGen(e.to_string()))?;
        self.put_code(b, at, &code)?;
        self.blocks[b].as_mut().expect("live block").count[op] = Some(at);
        Ok(Some(at))
    }

    /// The graph trampoline of op `op` in block `b` (and its slow path,
    /// the op's direct trampoline for function entries).
    fn graph_trampoline_in(&mut self, b: usize, op: usize) -> Result<Option<usize>, TraceError> {
        if let Some(t) = self.blocks[b].as_ref().expect("live block").graph[op] {
            return Ok(Some(t));
        }
        let entry = self.graph_entry_code(op).expect("Target::Graph only for an op with graph code");
        let g = self.graph_code.as_ref().expect("graph code implies its block");
        let (sh, thunk) = (g.shadow, g.block.addr());
        let Some(slow) = self.trampoline_in(b, Target::Direct(op), SitePlace::FunctionEntry)? else { return Ok(None) };
        let Some(at) = self.alloc_in(b, GRAPH_TRAMP_BYTES) else { return Ok(None) };
        let emit: tramp::Emit<'_> = &entry;
        let code = tramp::graph_trampoline(at, &sh, op, (thunk, slow), emit)
            .map_err(|e| TraceError::CodeGen(e.to_string()))?;
        self.put_code(b, at, &code)?;
        self.blocks[b].as_mut().expect("live block").graph[op] = Some(at);
        Ok(Some(at))
    }

    /// The trampoline for `target` and sites at `place` in block `b`,
    /// generating it if needed; `None` if the block is full.
    fn trampoline_in(&mut self, b: usize, target: Target, place: SitePlace) -> Result<Option<usize>, TraceError> {
        match target {
            Target::Count(op) => return self.count_trampoline_in(b, op),
            Target::Graph(op) => return self.graph_trampoline_in(b, op),
            _ => {}
        }
        if let Some(t) = Self::cached(self.blocks[b].as_ref().expect("live block"), target, place) {
            return Ok(Some(t));
        }
        let (k, live) = match place {
            SitePlace::FunctionEntry => (0, tramp::Live::FunctionEntry),
            _ => (1, tramp::Live::Body),
        };
        let Some(at) = self.alloc_in(b, 1024) else { return Ok(None) };
        let (handler, ctx) = match target {
            Target::List => (hot::on_entry_list as *const () as usize, 0),
            Target::Direct(op) => (hot::on_entry_direct as *const () as usize, op),
            Target::Off | Target::Count(_) | Target::Graph(_) => unreachable!("handled above"),
        };
        let code = tramp::entry_trampoline(at, handler, ctx, self.avx, live)
            .map_err(|e| TraceError::CodeGen(e.to_string()))?;
        self.put_code(b, at, &code)?;
        let blk = self.blocks[b].as_mut().expect("live block");
        match target {
            Target::List => blk.list[k] = Some(at),
            Target::Direct(op) => blk.direct[k][op] = Some(at),
            Target::Off | Target::Count(_) | Target::Graph(_) => {}
        }
        Ok(Some(at))
    }

    /// The trampoline for `target` at `place` block `blk` has already.
    fn cached(blk: &TrampBlock, target: Target, place: SitePlace) -> Option<usize> {
        let k = if place == SitePlace::FunctionEntry { 0 } else { 1 };
        match target {
            Target::Off => None,
            Target::List => blk.list[k],
            Target::Direct(op) => blk.direct[k][op],
            Target::Count(op) => blk.count[op],
            Target::Graph(op) => blk.graph[op],
        }
    }

    /// The trampoline for `target` at `place`: an existing one, else new
    /// code in the newest block with room, else in a new block.
    pub(super) fn trampoline_for(&mut self, target: Target, place: SitePlace) -> Result<(usize, usize), TraceError> {
        // A poisoned block's newest code may never have been written.
        let live = || {
            self.blocks
                .iter()
                .enumerate()
                .filter_map(|(b, x)| x.as_ref().filter(|x| !x.code.is_poisoned()).map(|x| (b, x)))
        };
        if let Some(found) = live().find_map(|(b, blk)| Self::cached(blk, target, place).map(|t| (b, t))) {
            return Ok(found);
        }
        let newest = live().map(|(b, _)| b).next_back();
        if let Some(b) = newest {
            if let Some(t) = self.trampoline_in(b, target, place)? {
                return Ok((b, t));
            }
        }
        let b = self.new_block()?;
        let t = self.trampoline_in(b, target, place)?.expect("a fresh block has room for any trampoline");
        Ok((b, t))
    }

    /// An op's count and graph trampolines hold its own code: forgotten
    /// when the op goes, so that the next op with its id gets its own.
    /// (The code stays until its block is retired; nothing points there.)
    pub(super) fn forget_op_trampolines(&mut self, op: usize) {
        for blk in self.blocks.iter_mut().flatten() {
            blk.count[op] = None;
            blk.graph[op] = None;
        }
    }

    /// The never-freed routines stubs call (`arch::tramp::register_routine`
    /// and, for `Counter::Calls`, `leave_routine`), made once.
    pub(super) fn routines(&mut self) -> Result<[usize; 3], TraceError> {
        if let Some(r) = &self.routines {
            return Ok(r.header);
        }
        let here = Self::routines as *const () as usize;
        let mem = |source| TraceError::TrampolineMemory { near: here, source };
        let gen = |e: crate::arch::asm::AsmError| TraceError::CodeGen(e.to_string());
        let code = CodeBlock::anywhere(4096).map_err(mem)?;
        let (call_at, graph_at, leave_at) = (code.addr(), code.addr() + 1024, code.addr() + 2048);
        let (call, graph, leave) = match self.counter {
            tramp::Counter::Tls(_) => {
                let handler = hot::stub_register as *const () as usize;
                (
                    tramp::register_routine(call_at, handler, self.avx, tramp::Skip::ToSite).map_err(gen)?,
                    tramp::register_routine(graph_at, handler, self.avx, tramp::Skip::ToResume).map_err(gen)?,
                    Vec::new(),
                )
            }
            tramp::Counter::Calls => {
                let (enter, leave) = (hot::stub_enter as *const () as usize, hot::stub_leave as *const () as usize);
                (
                    tramp::register_routine(call_at, enter, self.avx, tramp::Skip::ToSite).map_err(gen)?,
                    Vec::new(),
                    tramp::leave_routine(leave_at, leave, self.avx).map_err(gen)?,
                )
            }
        };
        assert!(call.len() <= 1024 && graph.len() <= 1024 && leave.len() <= 1024);
        code.write(0, &call).map_err(mem)?;
        code.write(1024, &graph).map_err(mem)?;
        code.write(2048, &leave).map_err(mem)?;
        let header = [call_at, graph_at, leave_at];
        self.routines = Some(Routines { header, _code: code });
        Ok(header)
    }

    /// A stub block for `object` within reach of every address in
    /// `[lo, addr]` (site `addr`, and for a pad enabled by one byte its
    /// mirror slot `lo`), as near the site as can be (a pad's mirror is
    /// 1.74 GiB below, among other objects' mirrors).
    fn new_stub_block(&mut self, lo: usize, addr: usize, object: ObjectId) -> Result<usize, TraceError> {
        let header = self.routines()?;
        let mem = |source| TraceError::TrampolineMemory { near: addr, source };
        let code = stub_code_near(lo, addr, STUBS_PER_BLOCK * tramp::STUB_CODE).map_err(mem)?;
        let data = retry_elsewhere(|k| {
            let shift = k * (32 << 20); // aarch64 only: the data is reached by adrp, ±4 GiB
            let (lo, hi) = (code.addr().saturating_sub(shift), (code.addr() + code.len()).saturating_sub(shift));
            DataBlock::near(lo, hi, STUBS_PER_BLOCK * tramp::STUB_DATA)
        })
        .map_err(mem)?;
        let words = [(tramp::HDR_CALL, header[0]), (tramp::HDR_GRAPH, header[1]), (tramp::HDR_LEAVE, header[2])];
        for (off, value) in words {
            // SAFETY: the header slot of our fresh, writable data block, not
            // yet reachable by any thread.
            unsafe { ((data.addr() + off) as *mut usize).write(value) };
        }
        self.stub_blocks.push(Some(StubBlock { code, data, object, used: 1 }));
        Ok(self.stub_blocks.len() - 1)
    }

    /// A free slot of stub memory for site `i`, taken: (stub block, its
    /// code's address). Within rel32 reach of the site, and of its mirror
    /// slot when it is a pad enabled by one byte (`mirror`: the slot jumps
    /// to its stubs and adapters).
    pub(super) fn stub_code_slot(&mut self, i: usize) -> Result<(usize, usize), TraceError> {
        let (addr, object) = (self.sites[i].addr, self.sites[i].object);
        let mirror = self.mirror_addr(i);
        let reach = |at: usize| {
            arch::encode_call(addr, at).is_some() && mirror.is_none_or(|m| arch::encode_jmp(m, at).is_some())
        };
        let has_room = |sb: &StubBlock| {
            sb.object == object
                && !sb.code.is_poisoned()
                && sb.used < STUBS_PER_BLOCK
                && reach(sb.code.addr() + sb.used * tramp::STUB_CODE)
        };
        let sb = match self.stub_blocks.iter().position(|x| x.as_ref().is_some_and(has_room)) {
            Some(sb) => sb,
            None => self.new_stub_block(mirror.unwrap_or(addr).min(addr), addr, object)?,
        };
        let blk = self.stub_blocks[sb].as_mut().expect("live stub block");
        let at = blk.code.addr() + blk.used * tramp::STUB_CODE;
        blk.used += 1;
        Ok((sb, at))
    }

    /// Makes site `i`'s stub of `kind` (its word at the null path).
    fn new_stub(&mut self, i: usize, kind: StubKind) -> Result<Stub, TraceError> {
        let (addr, place) = (self.sites[i].addr, self.sites[i].place);
        let (sb, at) = self.stub_code_slot(i)?;
        let blk = self.stub_blocks[sb].as_mut().expect("live stub block");
        let slot = (at - blk.code.addr()) / tramp::STUB_CODE;
        let (data, header) = (blk.data.addr() + slot * tramp::STUB_DATA, blk.data.addr());
        let slot_info = hot::site_slot(i as u32).expect("site slot");
        let func = slot_info.func.load(Ordering::Relaxed);
        let code = match (kind, self.counter) {
            (StubKind::Call, c) => call_stub(at, data, header, i as u32, c, (addr, place)),
            (StubKind::Count, c) => call_stub(at, data, header, func, c, (addr, place)),
            (StubKind::Graph, tramp::Counter::Tls(off)) => {
                tramp::graph_stub(at, data, header, off, (addr + arch::REL32_LEN, i as u32, func))
            }
            (StubKind::Graph, tramp::Counter::Calls) => unreachable!("graph targets need Counter::Tls"),
        };
        let code = code.ok_or(TraceError::CodeGen("stub data out of reach".into()))?;
        // SAFETY: a slot of our writable data block no thread can reach yet
        // (no site calls this stub before the batch that patches it, which
        // orders these stores before it).
        unsafe { std::ptr::copy_nonoverlapping(code.data.as_ptr(), data as *mut u8, tramp::STUB_DATA) };
        blk.code
            .write(slot * tramp::STUB_CODE, &code.code)
            .map_err(|source| TraceError::TrampolineMemory { near: at, source })?;
        Ok(Stub { code: at, word: data + code.word, null: code.null, block: None })
    }

    /// Makes sure site `i` has its stub for `target` and that `target`'s
    /// trampoline exists; where the stub's word must point.
    pub(super) fn make_stub(&mut self, i: usize, target: Target) -> Result<Wire, TraceError> {
        let kind = target.stub_kind().expect("a target with a trampoline");
        let stub = match self.sites[i].stubs[kind as usize] {
            Some(s) => s,
            None => {
                let s = self.new_stub(i, kind)?;
                self.sites[i].stubs[kind as usize] = Some(s);
                s
            }
        };
        let (block, tramp) = self.trampoline_for(target, self.sites[i].place)?;
        Ok(Wire { block, tramp, stub: stub.code })
    }

    /// Points site `i`'s stub of `kind` at trampoline `to` (block, address),
    /// or at its null path; the block it leaves is retired if no word
    /// points into it any more.
    pub(super) fn point_word(&mut self, i: usize, kind: StubKind, to: Option<(usize, usize)>) {
        let Some(stub) = self.sites[i].stubs[kind as usize].as_mut() else { return };
        let value = to.map_or(stub.null, |(_, t)| t);
        // SAFETY: the word is an aligned usize in a data block of ours that
        // lives as long as the stub.
        let word = unsafe { &*(stub.word as *const AtomicUsize) };
        // Release: the trampoline's code (written before, and synced) is
        // there before a thread can read its address; pairs with the
        // stub's load of the word (`call [word]`, an x86 load: acquire).
        word.store(value, Ordering::Release);
        let old = std::mem::replace(&mut stub.block, to.map(|(b, _)| b));
        if let Some((b, _)) = to {
            self.blocks[b].as_mut().expect("live block").users += 1;
        }
        if let Some(b) = old {
            let blk = self.blocks[b].as_mut().expect("live block");
            blk.users -= 1;
            if blk.users == 0 {
                let blk = self.blocks[b].take().expect("live block");
                self.retired.push(Retired::Block(blk.code));
            }
        }
    }

    /// The words of the stubs `changes` made point at new trampolines in
    /// step 1 (stubs their sites did not call yet) back at their null paths:
    /// the change failed. A straggler (a thread on the first instruction
    /// of such a stub since an earlier use) may have followed them, so the
    /// blocks they leave go through a grace period like any.
    pub(super) fn unwire(&mut self, changes: impl Iterator<Item = (usize, Target)>) {
        for (i, target) in changes {
            let kind = target.stub_kind();
            if let Some(k) = kind.filter(|&k| Some(k) != self.sites[i].target.stub_kind()) {
                self.point_word(i, k, None);
            }
        }
    }

    /// The address ranges of stub blocks whose code may not have been
    /// written (a failed batch poisoned them).
    pub(super) fn poisoned_stub_ranges(&self) -> Vec<std::ops::Range<usize>> {
        self.stub_blocks
            .iter()
            .flatten()
            .filter(|sb| sb.code.is_poisoned())
            .map(|sb| sb.code.addr()..sb.code.addr() + sb.code.len())
            .collect()
    }

    /// After a failed [`WriteSession`](crate::text::codemem::WriteSession):
    /// the code made in it may not be in its blocks. Stubs in a poisoned
    /// block that their site does not call are forgotten (a slot lost; one
    /// the site calls was written in an earlier change), and poisoned
    /// trampoline blocks no word points into are retired; new trampolines
    /// never go to a poisoned block (see `trampoline_for`).
    pub(super) fn forget_unwritten_code(&mut self) {
        let poisoned = self.poisoned_stub_ranges();
        for s in self.sites.iter_mut() {
            let calls = s.target.stub_kind();
            for (k, stub) in s.stubs.iter_mut().enumerate() {
                let unwritten = stub.is_some_and(|st| poisoned.iter().any(|r| r.contains(&st.code)));
                if unwritten && calls.map(|c| c as usize) != Some(k) {
                    *stub = None;
                }
            }
        }
        for b in 0..self.blocks.len() {
            if self.blocks[b].as_ref().is_some_and(|blk| blk.code.is_poisoned() && blk.users == 0) {
                let blk = self.blocks[b].take().expect("live block");
                self.retired.push(Retired::Block(blk.code));
            }
        }
    }
}
