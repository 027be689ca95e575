//! Run-time generated patch sites (see the module docs of `stress`,
//! "Sites"), and executable memory holding given code.

// Without `testing`, only the stress run uses them, and not every method.
#![cfg_attr(not(feature = "testing"), allow(dead_code))]

use super::Layout;
use crate::arch::{encode_call, NOP5};
use crate::text::codemem::CodeBlock;
use crate::{Batch, Poke};
use std::io;
use std::sync::atomic::AtomicU64;

const TRAMPOLINE: [u8; 4] = [0x48, 0xff, 0x07, 0xc3]; // inc qword [rdi]; ret
const STRIDE: usize = 12;
const FIRST: usize = 16;
const REGION_NOPS: [u8; 5] = [0x66, 0x90, 0x0f, 0x1f, 0x00];

/// Executable memory with `n` patchable site functions.
pub struct SiteArena {
    base: usize,
    #[allow(dead_code)] // owns the mapping
    map: CodeMap,
    n: usize,
    layout: Layout,
}

// SAFETY: the arena is immutable from Rust's point of view (its code changes
// only through the poke engine, which is thread-safe).
unsafe impl Send for SiteArena {}
// SAFETY: as for Send: nothing in it is changed through a shared reference
// but by the poke engine, which serialises its commits.
unsafe impl Sync for SiteArena {}

impl SiteArena {
    /// Maps and fills an arena of `n` sites.
    pub fn new(n: usize, layout: Layout) -> io::Result<SiteArena> {
        let mut code = vec![0xccu8; FIRST + STRIDE * n];
        code[..TRAMPOLINE.len()].copy_from_slice(&TRAMPOLINE);
        let off_bytes = match layout {
            Layout::Single => NOP5,
            Layout::Region => REGION_NOPS,
        };
        for i in 0..n {
            let off = FIRST + STRIDE * i;
            code[off..off + 5].copy_from_slice(&off_bytes);
            code[off + 5] = 0xc3;
        }
        let map = CodeMap::new(&code)?;
        Ok(SiteArena { base: map.addr(), map, n, layout })
    }

    pub fn len(&self) -> usize {
        self.n
    }
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
    pub fn layout(&self) -> Layout {
        self.layout
    }
    /// Address of site (and function) `i`.
    pub fn site(&self, i: usize) -> usize {
        self.base + FIRST + STRIDE * i
    }
    /// Address of the counting trampoline.
    pub fn trampoline(&self) -> usize {
        self.base
    }
    /// The bytes of a disabled site.
    pub fn off_bytes(&self) -> [u8; 5] {
        match self.layout {
            Layout::Single => NOP5,
            Layout::Region => REGION_NOPS,
        }
    }
    /// The bytes of enabled site `i`.
    pub fn on_bytes(&self, i: usize) -> [u8; 5] {
        encode_call(self.site(i), self.trampoline()).expect("trampoline is in the arena")
    }
    /// Number of sites whose 5 bytes cross a 64-byte cache line.
    pub fn straddling(&self) -> usize {
        (0..self.n).filter(|&i| self.site(i) / 64 != (self.site(i) + 4) / 64).count()
    }

    /// The poke turning site `i` on (`on`) or off.
    pub fn poke(&self, i: usize, on: bool) -> Poke {
        let (old, new) = if on { (self.off_bytes(), self.on_bytes(i)) } else { (self.on_bytes(i), self.off_bytes()) };
        let p = match self.layout {
            Layout::Single => Poke::new(self.site(i), old, new),
            Layout::Region => Poke::region(self.site(i), old, new),
        };
        p.named(format!("arena site {i}"))
    }

    /// One batch turning every site on or off.
    pub fn batch(&self, on: bool) -> Batch {
        (0..self.n).map(|i| self.poke(i, on)).collect()
    }

    /// Calls site function `i`, which increments `*counter` iff enabled.
    #[inline(always)]
    pub fn call(&self, i: usize, counter: &AtomicU64) {
        // SAFETY: site(i) is a function of this arena following the C ABI:
        // it takes a pointer in rdi and, when enabled, increments the u64 it
        // points to (a single-writer counter; readers use atomic loads).
        let f: extern "C" fn(*mut u64) = unsafe { std::mem::transmute(self.site(i)) };
        f(counter.as_ptr());
    }
}

/// Executable memory holding given code, padded with `int3` to whole
/// pages; never writable (a [`CodeBlock`] written through
/// `/proc/self/mem`, so it works under MDWE too).
pub struct CodeMap {
    block: CodeBlock,
}

impl CodeMap {
    /// Maps `code`.
    pub fn new(code: &[u8]) -> io::Result<CodeMap> {
        let block = CodeBlock::anywhere(code.len())?;
        let mut padded = code.to_vec();
        padded.resize(block.len(), 0xcc);
        block.write(0, &padded)?;
        Ok(CodeMap { block })
    }

    pub fn addr(&self) -> usize {
        self.block.addr()
    }

    /// The bytes now at `addr + off`.
    pub fn bytes(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.block.len());
        // SAFETY: inside our readable mapping.
        unsafe { std::slice::from_raw_parts((self.block.addr() + off) as *const u8, len) }.to_vec()
    }
}
