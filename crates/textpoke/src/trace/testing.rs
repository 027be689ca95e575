//! For the tests of ops with inline code (`testing` builds): the tracer's
//! trampolines generated around the op's code at fixed addresses, as a
//! traced call runs them, so that a test can keep the op's fast paths
//! short without reaching into `arch::tramp`.

use super::hot;
use super::hot::EmitFn;
use crate::arch::tramp;

/// The fast paths of the trampolines around an op's inline code: how many
/// instructions a traced call runs there when nothing is unusual (the
/// path that takes no conditional branch), and a listing of the code.
#[derive(Debug, Clone)]
pub struct FastPaths {
    /// The graph trampoline, from its first instruction to its jump into
    /// the graph return block's thunk (the op's `entry` code included).
    pub graph_entry: usize,
    /// The return trampoline of the graph return block, to its `ret` (the
    /// op's `exit` code included).
    pub graph_return: usize,
    /// The count trampoline, to its `ret` (the op's `count` code included).
    pub count: usize,
    /// The graph trampoline and the graph return block, disassembled.
    pub listing: String,
}

/// Generates the graph trampoline (with `entry`), the graph return block
/// (with `exit`) and the count trampoline (with `count`) at fixed
/// addresses, and measures their fast paths. `None` when the shadow
/// stacks' layout is not known (the tracer's thread-local is not in the
/// static TLS block): then the tracer makes no graph trampolines either.
/// Panics if the code does not assemble.
pub fn inline_fast_paths(count: EmitFn, entry: EmitFn, exit: EmitFn) -> Option<FastPaths> {
    const GRAPH: usize = 0x10000;
    const SLOW: usize = 0x20000;
    const HANDLER: usize = 0x30000;
    const BLOCK: usize = 0x40000;
    const COUNT: usize = 0x50000;
    let sh = hot::shadow_offsets()?;
    let (count, entry, exit): (tramp::Emit<'_>, tramp::Emit<'_>, tramp::Emit<'_>) = (&count, &entry, &exit);
    let g = tramp::graph_trampoline(GRAPH, &sh, 3, (BLOCK, SLOW), entry).expect("the graph trampoline assembles");
    let r = tramp::return_block(BLOCK, HANDLER, true, Some((&sh, exit))).expect("the return block assembles");
    let c = tramp::count_trampoline(COUNT, count, SLOW).expect("the count trampoline assembles");
    let ret = BLOCK + tramp::RETURN_OFFSET;
    Some(FastPaths {
        graph_entry: tramp::straight_path(GRAPH as u64, &g),
        graph_return: tramp::straight_path(ret as u64, &r[tramp::RETURN_OFFSET..]),
        count: tramp::straight_path(COUNT as u64, &c),
        listing: listing(GRAPH, &g) + &listing(BLOCK, &r),
    })
}

/// The code at `at`, disassembled.
#[cfg(target_arch = "x86_64")]
fn listing(at: usize, code: &[u8]) -> String {
    tramp::listing(at, code)
}

/// The code at `at`, one word a line (no disassembler here: feed the words
/// to `aarch64-linux-gnu-objdump` to read them).
#[cfg(target_arch = "aarch64")]
fn listing(at: usize, code: &[u8]) -> String {
    code.chunks_exact(4)
        .enumerate()
        .map(|(i, w)| format!("{:#x}: {:08x}\n", at + 4 * i, u32::from_le_bytes(w.try_into().unwrap())))
        .collect()
}
