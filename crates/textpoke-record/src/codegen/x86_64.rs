//! The recorder's inline code for the tracer's trampolines (x86-64): the
//! count (K1–K4), entry (H1–H8 and K3) and exit (H1–H8) steps of
//! `buffer.rs`, generated with the assembler `arch` offers. The tracer
//! places them in its count, graph and return trampolines
//! (`arch::tramp`), which say which registers hold the inputs and which
//! may be clobbered; each piece falls through when it recorded and jumps
//! to the trampoline's `fail` label, having changed nothing, when it
//! cannot (no buffer yet, a stale session, a monotonic clock, a full
//! segment, a field that does not fit a compact event, a nested call): the
//! trampoline then calls [`super::RecordOp`] through the hot path, which
//! does the same work in Rust and handles every case.

use super::buffer::{buffer_layout, BufferLayout};
use super::format::{self, KIND_ENTRY, KIND_EXIT};
use textpoke::arch::asm::{
    byte_ptr, dword_ptr, qword_ptr, AsmError, Assembler, Label, Reg32::*, Reg64, Reg64::*, Reg8::*,
};
use textpoke::clock::{MODE_TSC_ORDERED, MODE_TSC_UNORDERED};

/// The largest delta a compact event holds, plus one.
const DELTA_LIMIT: i32 = 1 << format::DELTA_BITS;
const _: () = assert!(format::DELTA_BITS < 31);

fn layout() -> BufferLayout {
    // `RecordOp::inline` offers code only when the layout is known.
    buffer_layout().expect("inline code is offered only with a known buffer layout")
}

/// K1–K4 for the count trampoline: rcx = the function id; clobbers rax,
/// rcx, rdx, rsi.
pub(crate) fn emit_count(a: &mut Assembler, fail: Label) -> Result<(), AsmError> {
    let l = layout();
    let undo = a.create_label();
    let done = a.create_label();
    a.mov(rax, qword_ptr(l.tls_buf).fs())?; // this thread's buffer
    a.test(rax, rax)?;
    a.jz(fail)?;
    a.mov(edx, dword_ptr(rax + l.busy))?; // K1: was = busy; busy = 1
    a.mov(dword_ptr(rax + l.busy), 1)?;
    a.mov(rsi, l.active as u64)?;
    a.mov(rsi, qword_ptr(rsi))?;
    a.cmp(rsi, qword_ptr(rax + l.session))?; // K2: current session
    a.jne(undo)?;
    a.cmp(rcx, qword_ptr(rax + l.ncounters))?; // K2: in range
    a.jae(undo)?;
    a.mov(rsi, qword_ptr(rax + l.counters))?;
    a.inc(qword_ptr(rsi + rcx * 8))?; // K3: one instruction
    a.mov(dword_ptr(rax + l.busy), edx)?; // K4 (a plain store is a release on x86)
    a.jmp(done)?;
    a.set_label(undo)?;
    a.mov(dword_ptr(rax + l.busy), edx)?;
    a.jmp(fail)?;
    a.set_label(done)?;
    a.nop() // the label needs an instruction; the trampoline's code follows
}

/// H1–H3 with the buffer in `buf` and `t` a scratch register: the buffer,
/// not busy (else `fail`), busy taken, the session current (else `undo`).
fn claim(
    a: &mut Assembler,
    l: &BufferLayout,
    (buf, t): (Reg64, Reg64),
    (fail, undo): (Label, Label),
) -> Result<(), AsmError> {
    a.mov(buf, qword_ptr(l.tls_buf).fs())?; // H1
    a.test(buf, buf)?;
    a.jz(fail)?;
    a.cmp(dword_ptr(buf + l.busy), 0)?; // H2: nested events drop in the slow path
    a.jne(fail)?;
    a.mov(dword_ptr(buf + l.busy), 1)?;
    a.mov(t, l.active as u64)?; // H3
    a.mov(t, qword_ptr(t))?;
    a.cmp(t, qword_ptr(buf + l.session))?;
    a.jne(undo)
}

/// H0: reads the TSC into rax as the clock's mode byte says (a monotonic
/// clock goes to `fail`: nothing was claimed yet); clobbers rdx. First
/// thing in a piece, so that the ordered read's `lfence` waits for as few
/// earlier instructions as possible and the checks after it overlap its
/// latency (a signal handler recording meanwhile is why H5 clamps).
fn read_tsc(a: &mut Assembler, l: &BufferLayout, fail: Label, cold: &mut Vec<Cold>) -> Result<(), AsmError> {
    let unordered = a.create_label();
    let read = a.create_label();
    a.mov(rdx, l.clock_mode as u64)?;
    a.movzx(edx, byte_ptr(rdx))?;
    a.cmp(edx, MODE_TSC_ORDERED as u32)?;
    a.jne(unordered)?;
    a.lfence()?;
    a.set_label(read)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    cold.push(Cold::Unordered { at: unordered, read, fail });
    Ok(())
}

/// H5: clamps the time in rax to the thread's last one and leaves the
/// delta in rdx (to `undo` if it does not fit a compact event).
fn clamp_delta(a: &mut Assembler, l: &BufferLayout, buf: Reg64, undo: Label) -> Result<(), AsmError> {
    a.mov(rdx, qword_ptr(buf + l.last_ts))?; // never below the last time
    a.cmp(rax, rdx)?;
    a.cmovb(rax, rdx)?;
    a.neg(rdx)?;
    a.add(rdx, rax)?; // the delta
    a.cmp(rdx, DELTA_LIMIT)?;
    a.jae(undo)
}

/// Code placed after a piece's main path, out of the way of the common
/// case.
enum Cold {
    /// The clock is not the ordered TSC: plain `rdtsc` if it is the
    /// unordered one, else the slow path.
    Unordered { at: Label, read: Label, fail: Label },
    /// Give `busy` back and fail.
    Undo { at: Label, buf: Reg64, fail: Label },
}

/// Ends a piece: jumps over the cold code, emits it, and gives the label
/// the trampoline's code follows.
fn finish(a: &mut Assembler, l: &BufferLayout, cold: Vec<Cold>) -> Result<(), AsmError> {
    let done = a.create_label();
    a.jmp(done)?;
    for c in cold {
        match c {
            Cold::Unordered { at, read, fail } => {
                a.set_label(at)?;
                a.cmp(edx, MODE_TSC_UNORDERED as u32)?;
                a.jne(fail)?;
                a.jmp(read)?;
            }
            Cold::Undo { at, buf, fail } => {
                a.set_label(at)?;
                a.mov(dword_ptr(buf + l.busy), 0)?;
                a.jmp(fail)?;
            }
        }
    }
    a.set_label(done)?;
    a.nop()
}

/// The entry event of a graph trampoline: rdi = the function id, rcx =
/// the depth; clobbers rax, rcx, rdx, rsi, rdi, r8. H0, then counts the
/// call (K3) and H1–H8 with one compact word.
pub(crate) fn emit_entry(a: &mut Assembler, fail: Label) -> Result<(), AsmError> {
    let l = layout();
    let undo = a.create_label();
    let mut cold = vec![Cold::Undo { at: undo, buf: r8, fail }];
    read_tsc(a, &l, fail, &mut cold)?; // rax
    claim(a, &l, (r8, rdx), (fail, undo))?;
    a.cmp(rdi, qword_ptr(r8 + l.ncounters))?; // out of range: counted as such by the slow path
    a.jae(undo)?;
    a.mov(rsi, qword_ptr(r8 + l.pos))?; // H4: room for one word
    a.lea(rdx, qword_ptr(rsi + 8))?;
    a.cmp(rdx, qword_ptr(r8 + l.end))?;
    a.ja(undo)?;
    clamp_delta(a, &l, r8, undo)?;
    a.mov(qword_ptr(r8 + l.last_ts), rax)?;
    a.mov(rax, qword_ptr(r8 + l.counters))?; // K3: one instruction
    a.inc(qword_ptr(rax + rdi * 8))?;
    // The word: kind | depth << 2 | function << 16 | delta << 38.
    a.shl(rdx, format::DELTA_SHIFT)?;
    a.shl(rdi, format::FUNC_SHIFT)?;
    a.or(rdx, rdi)?;
    a.shl(rcx, format::DEPTH_SHIFT)?;
    a.or(rdx, rcx)?;
    a.or(rdx, KIND_ENTRY as i32)?;
    a.mov(qword_ptr(rsi), rdx)?; // H6
    a.add(rsi, 8)?;
    a.mov(qword_ptr(r8 + l.pos), rsi)?; // H7 (x86 stores are release)
    a.mov(dword_ptr(r8 + l.busy), 0)?; // H8
    finish(a, &l, cold)
}

/// The exit event of a return trampoline: rdx = `function | depth << 32`,
/// the return value at `[rsp+8]`; clobbers rax, rdx, rsi, r8, r9, r10,
/// r11 and keeps rcx and rdi. H0, then H1–H8 with one compact word, and
/// the value after it when the function's bit in `retval` is set.
pub(crate) fn emit_exit(a: &mut Assembler, fail: Label) -> Result<(), AsmError> {
    let l = layout();
    let undo = a.create_label();
    let mut cold = vec![Cold::Undo { at: undo, buf: r8, fail }];
    a.mov(r10d, edx)?; // the function
    a.mov(r11, rdx)?;
    a.shr(r11, 32)?; // the depth
    read_tsc(a, &l, fail, &mut cold)?; // rax
    claim(a, &l, (r8, rdx), (fail, undo))?;
    // r9 = 1 when the return value is wanted: the function's bit.
    a.mov(rdx, super::op::retval_bits() as u64)?;
    a.mov(r9, r10)?;
    a.shr(r9, 6)?;
    a.mov(r9, qword_ptr(rdx + r9 * 8))?;
    a.bt(r9, r10)?; // the bit index is taken modulo 64
    a.setc(r9b)?;
    a.movzx(r9d, r9b)?;
    a.mov(rsi, qword_ptr(r8 + l.pos))?; // H4: room for two words, always
    a.lea(rdx, qword_ptr(rsi + 16))?;
    a.cmp(rdx, qword_ptr(r8 + l.end))?;
    a.ja(undo)?;
    clamp_delta(a, &l, r8, undo)?;
    a.mov(qword_ptr(r8 + l.last_ts), rax)?;
    a.shl(rdx, format::DELTA_SHIFT)?;
    a.shl(r10, format::FUNC_SHIFT)?;
    a.or(rdx, r10)?;
    a.shl(r11, format::DEPTH_SHIFT)?;
    a.or(rdx, r11)?;
    a.or(rdx, KIND_EXIT as i32)?;
    a.add(rdx, r9)?; // KIND_EXIT + 1 = KIND_EXIT_VALUE
    a.mov(qword_ptr(rsi), rdx)?; // H6
    a.mov(rdx, qword_ptr(rsp + 8))?;
    a.mov(qword_ptr(rsi + 8), rdx)?; // the value, kept only if r9 says so
    a.lea(rsi, qword_ptr(rsi + r9 * 8 + 8))?;
    a.mov(qword_ptr(r8 + l.pos), rsi)?; // H7
    a.mov(dword_ptr(r8 + l.busy), 0)?; // H8
    finish(a, &l, cold)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each instruction between the two ordered clock reads of a traced
    /// call costs about 0.035 ns (`lfence` waits for them to retire): a
    /// guard against the fast paths growing unnoticed. Counts the tracer's
    /// frame with the recorder's code in it, as a traced call runs it.
    #[test]
    fn graph_fast_paths_stay_short() {
        if buffer_layout().is_none() {
            return; // no inline code without a known buffer layout
        }
        let Some(p) = textpoke::trace::inline_fast_paths(emit_count, emit_entry, emit_exit) else { return };
        let (e, r, c) = (p.graph_entry, p.graph_return, p.count);
        println!("fast paths: graph entry {e}, return {r}, count {c} instructions");
        if std::env::var_os("TEXTPOKE_DUMP_CODE").is_some() {
            print!("{}", p.listing);
        }
        // Measured: entry 96, return 86, count 27.
        assert!(e <= 100 && r <= 90 && c <= 28, "entry {e}, return {r}, count {c}");
    }
}
