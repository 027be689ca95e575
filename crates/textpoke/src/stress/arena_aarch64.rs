//! Run-time generated patch sites on aarch64 (see the module docs of
//! `stress`, "Sites"; the x86-64 arena is `arena.rs`), and executable
//! memory holding given code.
//!
//! Site function `i` (the shape of a prepared patchable entry, seed 003):
//!
//! ```text
//! Single:  mov x9, x30 ; nop | bl tramp            ; mov x30, x9 ; ret
//! Region:  mov x9, x30 ; nop; nop | mov x9, x30; bl tramp ; mov x30, x9 ; ret
//! ```
//!
//! The trampoline increments `*x0` and returns through x30 (`ldr x1,
//! [x0]; add x1, x1, #1; str x1, [x0]; ret`), leaving x9 alone; the site
//! function then returns to its caller through the x30 it saved in x9.
//! A Single site's poke is one NOP↔BL word (the swap strategy); a Region
//! site's is the two-word rewrite that needs stop-machine (the one-time
//! NOP→MOV of a gcc pad, done both ways here to exercise it).

// Without `testing`, only the stress run uses them, and not every method.
#![cfg_attr(not(feature = "testing"), allow(dead_code))]

use super::Layout;
use crate::arch::{self, encode_bl, BRK0, MOV_X30_X9, MOV_X9_X30, NOP_WORD, RET};
use crate::text::codemem::CodeBlock;
use crate::{Batch, Poke};
use std::io;
use std::sync::atomic::AtomicU64;

/// `ldr x1, [x0]; add x1, x1, #1; str x1, [x0]; ret`.
const TRAMPOLINE: [u32; 4] = [0xf940_0001, 0x9100_0421, 0xf900_0001, RET];
const STRIDE: usize = 32;
const FIRST: usize = 32;
/// Offset of the poked words in a site function (after `mov x9, x30`).
const POKE_OFFSET: usize = 4;

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

fn put(code: &mut [u8], off: usize, words: &[u32]) {
    for (i, w) in words.iter().enumerate() {
        code[off + 4 * i..off + 4 * i + 4].copy_from_slice(&w.to_le_bytes());
    }
}

impl SiteArena {
    /// Maps and fills an arena of `n` sites.
    pub fn new(n: usize, layout: Layout) -> io::Result<SiteArena> {
        let mut code = BRK0.to_le_bytes().repeat((FIRST + STRIDE * n) / 4);
        put(&mut code, 0, &TRAMPOLINE);
        for i in 0..n {
            let off = FIRST + STRIDE * i;
            let body: &[u32] = match layout {
                Layout::Single => &[MOV_X9_X30, NOP_WORD, MOV_X30_X9, RET],
                Layout::Region => &[MOV_X9_X30, NOP_WORD, NOP_WORD, MOV_X30_X9, RET],
            };
            put(&mut code, off, body);
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
    /// Address of the poked words of site `i`.
    pub fn site(&self, i: usize) -> usize {
        self.function(i) + POKE_OFFSET
    }
    /// Address of site function `i`.
    fn function(&self, i: usize) -> usize {
        self.base + FIRST + STRIDE * i
    }
    /// Address of the counting trampoline.
    pub fn trampoline(&self) -> usize {
        self.base
    }
    /// The bytes of a disabled site.
    pub fn off_bytes(&self) -> Vec<u8> {
        match self.layout {
            Layout::Single => arch::NOP.to_vec(),
            Layout::Region => arch::GCC_PAD.to_vec(),
        }
    }
    /// The bytes of enabled site `i`.
    pub fn on_bytes(&self, i: usize) -> Vec<u8> {
        let bl = |at: usize| encode_bl(at, self.trampoline()).expect("trampoline is in the arena").to_le_bytes();
        match self.layout {
            Layout::Single => bl(self.site(i)).to_vec(),
            Layout::Region => [MOV_X9_X30.to_le_bytes(), bl(self.site(i) + 4)].concat(),
        }
    }
    /// Number of sites whose bytes cross a 64-byte cache line (none: they
    /// are aligned words, 32-byte strides).
    pub fn straddling(&self) -> usize {
        let len = self.off_bytes().len();
        (0..self.n).filter(|&i| self.site(i) / 64 != (self.site(i) + len - 1) / 64).count()
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
        // SAFETY: function(i) follows the C ABI: it takes a pointer in x0
        // and, when enabled, increments the u64 it points to (a
        // single-writer counter; readers use atomic loads); it clobbers
        // only x1 and x9, caller-saved.
        let f: extern "C" fn(*mut u64) = unsafe { std::mem::transmute(self.function(i)) };
        f(counter.as_ptr());
    }
}

/// Executable memory holding given code, padded with `brk #0` to whole
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
        padded.extend(BRK0.to_le_bytes().iter().cycle().take(block.len() - code.len()));
        block.write(0, &padded)?;
        // Visible to instruction fetch before any thread calls into it.
        arch::sync_icache(block.addr(), block.len());
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
