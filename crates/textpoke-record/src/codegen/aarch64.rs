//! The recorder's inline code for the tracer's trampolines (aarch64): the
//! count (K1–K4), entry (H0–H8 and K3) and exit (H0–H8) steps of
//! `buffer.rs`, generated with the assembler `arch` offers
//! (`arch/aarch64/asm.rs`), as `x86_64.rs` does for x86-64. The tracer
//! places them in its count, graph and return trampolines
//! (`arch/tramp_aarch64.rs`), which say which registers hold the inputs
//! and which may be clobbered; each piece falls through when it recorded
//! and branches to the trampoline's `fail` label, having changed nothing,
//! when it cannot (no buffer yet, a stale session, a monotonic clock, a
//! full segment, a field that does not fit a compact event, a nested
//! call): the trampoline then calls [`super::RecordOp`] through the hot
//! path, which does the same work in Rust and handles every case.
//!
//! What differs from x86-64:
//!
//! - The clock: `CNTVCT_EL0`, read after an `isb` in the ordered mode (as
//!   `textpoke::clock` reads it: the ISB plays `lfence`'s part), without
//!   it in the unordered one.
//! - K3: no instruction adds to memory in one go without LSE. The counter
//!   is the thread's own, but a signal handler on the same thread may
//!   count between a load and a store, so the add is atomic: `stadd` when
//!   the CPU has LSE (ARMv8.1 atomics, read once from the hardware
//!   capabilities), else a load/store-exclusive loop, whose store fails
//!   and retries when a handler ran in between (an exception return
//!   clears the exclusive monitor). Relaxed, as `buffer::increment` is.
//! - Publishing: H7 (`pos`) and H8/K4 (`busy`) are store-releases
//!   (`stlr`), as the Rust hot path's `Release` stores compile to; x86-64's
//!   plain stores are releases already.
//! - Absolute addresses (the session word, the clock's mode byte, the
//!   return-value bitmap) are built with `movz`/`movk`: the code may be
//!   placed anywhere, beyond `adrp`'s reach.

use super::buffer::{buffer_layout, BufferLayout};
use super::format::{self, KIND_ENTRY, KIND_EXIT};
use textpoke::arch::asm::{AsmError, Assembler, Cond, Label, Reg, X0, X10, X11, X12, X13, X14, X15, X16, X17, X9, ZR};
use textpoke::clock::{MODE_TSC_ORDERED, MODE_TSC_UNORDERED};

const _: () = assert!(format::DELTA_SHIFT + format::DELTA_BITS == 64);

fn layout() -> BufferLayout {
    // `RecordOp::inline` offers code only when the layout is known.
    buffer_layout().expect("inline code is offered only with a known buffer layout")
}

/// Whether the CPU has the LSE atomics (`stadd`), read once.
fn has_lse() -> bool {
    static LSE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LSE.get_or_init(|| std::arch::is_aarch64_feature_detected!("lse"))
}

/// `d` = this thread's buffer pointer (`scratch` for a far TLS offset).
fn load_buf(a: &mut Assembler, l: &BufferLayout, d: Reg, scratch: Reg) -> Result<(), AsmError> {
    a.mrs_tpidr(d)?;
    if (0..32768).contains(&l.tls_buf) && l.tls_buf % 8 == 0 {
        return a.ldr(d, d, l.tls_buf);
    }
    a.add_offset(d, d, l.tls_buf, scratch)?;
    a.ldr(d, d, 0)
}

/// An offset in the buffer, for a load or store.
fn off(o: usize) -> i32 {
    o as i32
}

/// `stlr w/x t, [buf + o]` (through `scratch` unless `o` is 0).
fn store_release(a: &mut Assembler, t: Reg, (buf, o): (Reg, usize), scratch: Reg, wide: bool) -> Result<(), AsmError> {
    let base = if o == 0 {
        buf
    } else {
        a.add_imm(scratch, buf, o as u32)?;
        scratch
    };
    if wide {
        a.stlr(t, base)
    } else {
        a.stlr_w(t, base)
    }
}

/// K3: adds one to the u64 at `[addr]`, atomically (module docs); `val`
/// and `status` are clobbered.
fn increment(a: &mut Assembler, addr: Reg, val: Reg, status: Reg) -> Result<(), AsmError> {
    if has_lse() {
        a.mov_imm_w(val, 1)?;
        return a.stadd(val, addr);
    }
    let retry = a.create_label();
    a.set_label(retry)?;
    a.ldxr(val, addr)?;
    a.add_imm(val, val, 1)?;
    a.stxr(status, val, addr)?;
    a.cbnz_w(status, retry)
}

/// K1–K4 for the count trampoline: x9 = the function id (kept until it
/// fails); clobbers x9, x10, x11, x16, x17.
pub(crate) fn emit_count(a: &mut Assembler, fail: Label) -> Result<(), AsmError> {
    let l = layout();
    let undo = a.create_label();
    let done = a.create_label();
    let (buf, was) = (X16, X10);
    load_buf(a, &l, buf, X17)?;
    a.cbz(buf, fail)?;
    a.ldr_w(was, buf, off(l.busy))?; // K1: was = busy; busy = 1
    a.mov_imm_w(X11, 1)?;
    a.str_w(X11, buf, off(l.busy))?;
    a.mov_imm(X17, l.active as u64)?;
    a.ldr(X17, X17, 0)?;
    a.ldr(X11, buf, off(l.session))?;
    a.cmp(X17, X11)?; // K2: current session
    a.b_cond(Cond::Ne, undo)?;
    a.ldr(X11, buf, off(l.ncounters))?;
    a.cmp(X9, X11)?; // K2: in range
    a.b_cond(Cond::Hs, undo)?;
    a.ldr(X11, buf, off(l.counters))?;
    a.add_lsl(X11, X11, X9, 3)?;
    increment(a, X11, X17, X9)?; // K3 (x9 is not needed past the checks)
    store_release(a, was, (buf, l.busy), X17, false)?; // K4, pairs with S4
    a.b(done)?;
    a.set_label(undo)?;
    store_release(a, was, (buf, l.busy), X17, false)?;
    a.b(fail)?;
    a.set_label(done)
}

/// Code placed after a piece's main path, out of the way of the common
/// case.
enum Cold {
    /// The clock (mode byte in `mode`) is not the ordered one: a plain
    /// read if it is the unordered one, else the slow path.
    Unordered { at: Label, mode: Reg, read: Label, fail: Label },
    /// Give `busy` back and fail.
    Undo { at: Label, buf: Reg, fail: Label },
}

/// H0: reads the clock into `t` as the mode byte says (a monotonic clock
/// goes to `fail`: nothing was claimed yet), with the mode in `mode`.
/// First thing in a piece, so that the ordered read's `isb` waits for as
/// little earlier work as possible (a signal handler recording meanwhile
/// is why H5 clamps).
fn read_clock(
    a: &mut Assembler,
    l: &BufferLayout,
    (t, mode): (Reg, Reg),
    fail: Label,
    cold: &mut Vec<Cold>,
) -> Result<(), AsmError> {
    let unordered = a.create_label();
    let read = a.create_label();
    a.mov_imm(mode, l.clock_mode as u64)?;
    a.ldrb(mode, mode, 0)?;
    a.cmp_imm_w(mode, MODE_TSC_ORDERED as u32)?;
    a.b_cond(Cond::Ne, unordered)?;
    a.isb()?;
    a.set_label(read)?;
    a.mrs_cntvct(t)?;
    cold.push(Cold::Unordered { at: unordered, mode, read, fail });
    Ok(())
}

/// H1–H3 with the buffer in `buf` and `t`, `t2` scratch: the buffer, not
/// busy (else `fail`), busy taken, the session current (else `undo`).
fn claim(
    a: &mut Assembler,
    l: &BufferLayout,
    (buf, t, t2): (Reg, Reg, Reg),
    (fail, undo): (Label, Label),
) -> Result<(), AsmError> {
    load_buf(a, l, buf, t)?; // H1
    a.cbz(buf, fail)?;
    a.ldr_w(t, buf, off(l.busy))?; // H2: nested events drop in the slow path
    a.cbnz_w(t, fail)?;
    a.mov_imm_w(t, 1)?;
    a.str_w(t, buf, off(l.busy))?;
    a.mov_imm(t, l.active as u64)?; // H3
    a.ldr(t, t, 0)?;
    a.ldr(t2, buf, off(l.session))?;
    a.cmp(t, t2)?;
    a.b_cond(Cond::Ne, undo)
}

/// H4: room for `need` bytes at `pos` (loaded into `pos`), else `undo`.
fn room(
    a: &mut Assembler,
    l: &BufferLayout,
    (buf, pos, t, t2): (Reg, Reg, Reg, Reg),
    need: u32,
    undo: Label,
) -> Result<(), AsmError> {
    a.ldr(pos, buf, off(l.pos))?;
    a.add_imm(t, pos, need)?;
    a.ldr(t2, buf, off(l.end))?;
    a.cmp(t, t2)?;
    a.b_cond(Cond::Hi, undo)
}

/// H5: clamps the time in `now` to the thread's last one, stores it as
/// the last, and leaves the delta in `delta` (to `undo` if it does not fit
/// a compact event; nothing stored then).
fn clamp_delta(
    a: &mut Assembler,
    l: &BufferLayout,
    (buf, now, delta, t): (Reg, Reg, Reg, Reg),
    undo: Label,
) -> Result<(), AsmError> {
    a.ldr(delta, buf, off(l.last_ts))?; // never below the last time
    a.cmp(now, delta)?;
    a.csel(now, now, delta, Cond::Hs)?;
    a.sub(delta, now, delta)?;
    a.lsr_imm(t, delta, format::DELTA_BITS)?;
    a.cbnz(t, undo)?;
    a.str(now, buf, off(l.last_ts))
}

/// Ends a piece: branches over the cold code and emits it.
fn finish(a: &mut Assembler, l: &BufferLayout, cold: Vec<Cold>) -> Result<(), AsmError> {
    let done = a.create_label();
    a.b(done)?;
    for c in cold {
        match c {
            Cold::Unordered { at, mode, read, fail } => {
                a.set_label(at)?;
                a.cmp_imm_w(mode, MODE_TSC_UNORDERED as u32)?;
                a.b_cond(Cond::Ne, fail)?;
                a.b(read)?;
            }
            Cold::Undo { at, buf, fail } => {
                a.set_label(at)?;
                a.str_w(ZR, buf, off(l.busy))?;
                a.b(fail)?;
            }
        }
    }
    a.set_label(done)
}

/// The entry event of a graph trampoline: x9 = the function id, x10 =
/// the depth; clobbers x9–x15 and x17, keeps x16. H0, then counts the call
/// (K3) and H1–H8 with one compact word.
pub(crate) fn emit_entry(a: &mut Assembler, fail: Label) -> Result<(), AsmError> {
    let l = layout();
    let undo = a.create_label();
    let (func, depth, now, buf, pos) = (X9, X10, X11, X12, X13);
    let mut cold = vec![Cold::Undo { at: undo, buf, fail }];
    read_clock(a, &l, (now, X12), fail, &mut cold)?;
    claim(a, &l, (buf, X14, X15), (fail, undo))?;
    a.ldr(X14, buf, off(l.ncounters))?; // out of range: counted as such by the slow path
    a.cmp(func, X14)?;
    a.b_cond(Cond::Hs, undo)?;
    room(a, &l, (buf, pos, X14, X15), 8, undo)?; // H4: one word
    clamp_delta(a, &l, (buf, now, X15, X14), undo)?; // x15 = delta
    a.ldr(X14, buf, off(l.counters))?; // K3
    a.add_lsl(X14, X14, func, 3)?;
    increment(a, X14, X11, X17)?;
    // The word: kind | depth << 2 | function << 16 | delta << 38.
    a.lsl_imm(X15, X15, format::DELTA_SHIFT)?;
    a.orr_lsl(X15, X15, func, format::FUNC_SHIFT)?;
    a.orr_lsl(X15, X15, depth, format::DEPTH_SHIFT)?;
    a.add_imm(X15, X15, KIND_ENTRY as u32)?;
    a.str(X15, pos, 0)?; // H6
    a.add_imm(pos, pos, 8)?;
    store_release(a, pos, (buf, l.pos), X14, true)?; // H7, pairs with D1
    store_release(a, ZR, (buf, l.busy), X14, false)?; // H8, pairs with S4
    finish(a, &l, cold)
}

/// The exit event of a return trampoline: x9 = `function | depth << 32`,
/// x0 = the return value; clobbers x9, x10, x11, x14–x17 and keeps x12
/// and x13. H0, then H1–H8 with one compact word, and the value after it
/// when the function's bit in `retval` is set.
pub(crate) fn emit_exit(a: &mut Assembler, fail: Label) -> Result<(), AsmError> {
    let l = layout();
    let undo = a.create_label();
    let (fd, now, bit, buf, pos) = (X9, X10, X11, X14, X15);
    let mut cold = vec![Cold::Undo { at: undo, buf, fail }];
    read_clock(a, &l, (now, X11), fail, &mut cold)?;
    claim(a, &l, (buf, X16, X17), (fail, undo))?;
    // x11 = 1 when the return value is wanted: the function's bit.
    a.mov_imm(bit, super::op::retval_bits() as u64)?;
    a.ubfx(X16, fd, 6, 26)?; // the function's word (ids are below 2^32)
    a.ldr_index(bit, bit, X16)?;
    a.lsrv(bit, bit, fd)?; // the shift is taken modulo 64
    a.ubfx(bit, bit, 0, 1)?;
    room(a, &l, (buf, pos, X16, X17), 16, undo)?; // H4: two words, always
    clamp_delta(a, &l, (buf, now, X17, X16), undo)?; // x17 = delta
    a.lsl_imm(X17, X17, format::DELTA_SHIFT)?;
    a.mov_w(X16, fd)?; // the function
    a.orr_lsl(X17, X17, X16, format::FUNC_SHIFT)?;
    a.lsr_imm(X16, fd, 32)?; // the depth
    a.orr_lsl(X17, X17, X16, format::DEPTH_SHIFT)?;
    a.add_imm(X17, X17, KIND_EXIT as u32)?;
    a.add(X17, X17, bit)?; // KIND_EXIT + 1 = KIND_EXIT_VALUE
    a.str(X17, pos, 0)?; // H6
    a.str(X0, pos, 8)?; // the value, kept only if the bit says so
    a.add_lsl(pos, pos, bit, 3)?;
    a.add_imm(pos, pos, 8)?;
    store_release(a, pos, (buf, l.pos), X16, true)?; // H7, pairs with D1
    store_release(a, ZR, (buf, l.busy), X16, false)?; // H8, pairs with S4
    finish(a, &l, cold)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guard against the fast paths growing unnoticed: the tracer's
    /// trampolines with the recorder's code in them, counted along the
    /// path a traced call takes when nothing is unusual.
    #[test]
    fn graph_fast_paths_stay_short() {
        if buffer_layout().is_none() {
            return; // no inline code without a known buffer layout
        }
        let Some(p) = textpoke::trace::inline_fast_paths(emit_count, emit_entry, emit_exit) else { return };
        let (e, r, c) = (p.graph_entry, p.graph_return, p.count);
        println!("fast paths: graph entry {e}, return {r}, count {c} instructions (lse: {})", has_lse());
        if std::env::var_os("TEXTPOKE_DUMP_CODE").is_some() {
            print!("{}", p.listing);
        }
        // Measured: entry 90, return 86, count 25 with LSE; entry 92, count
        // 27 with the exclusive loop (ARCHITECTURE.md, "aarch64").
        assert!(e <= 92 && r <= 86 && c <= 27, "entry {e}, return {r}, count {c}");
    }
}
