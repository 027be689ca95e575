//! Typed errors of the poke engine.
//!
//! Every refusal names the address (and the symbol when one is known), says
//! what was expected and what was found, and tells the caller what to do.
//! A refusal from validation means nothing of the batch was written.

use std::fmt;

/// Where a poke is: its address and, when known, `symbol+offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// Address of the first byte of the poke.
    pub addr: usize,
    /// `function+0xoff` when a symbol or a caller-given name is known.
    pub symbol: Option<String>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.symbol {
            Some(s) => write!(f, "{:#x} ({s})", self.addr),
            None => write!(f, "{:#x}", self.addr),
        }
    }
}

/// Hex bytes, `0f 1f 44 00 00`.
pub(crate) struct Hex<'a>(pub &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Why a batch was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PokeError {
    #[error("poke at {at}: expected bytes ({expected}) and new bytes ({new}) differ in length; a poke replaces bytes one for one", expected = Hex(.expected), new = Hex(.new))]
    LengthMismatch { at: Location, expected: Vec<u8>, new: Vec<u8> },

    #[error("poke at {at}: empty poke; give at least one byte")]
    Empty { at: Location },

    #[error("poke at {at} (len {len}) overlaps poke at {other} (len {other_len}); split the batch or merge the pokes")]
    Overlap { at: Location, len: usize, other: Location, other_len: usize },

    #[error("poke at {at}: {len} byte(s) are not mapped in this process; was the code unloaded?")]
    NotMapped { at: Location, len: usize },

    #[error("poke at {at}: the mapping is {perms}, not executable; textpoke only patches code")]
    NotExecutable { at: Location, perms: String },

    #[error("poke at {at}: expected {expected}, found {found}; the code is not what the caller believes it is, nothing was written", expected = Hex(.expected), found = Hex(.found))]
    Mismatch { at: Location, expected: Vec<u8>, found: Vec<u8> },

    #[error("poke at {at}: the {which} bytes ({bytes}) are {what}, not exactly one instruction of {len} byte(s); a poke replaces one whole instruction (use Poke::region with the stop-machine strategy for several)", bytes = Hex(.bytes))]
    NotOneInstruction { at: Location, which: &'static str, bytes: Vec<u8>, len: usize, what: String },

    #[error("poke at {at}: the {which} bytes ({bytes}) do not decode as whole instructions covering exactly {len} byte(s)", bytes = Hex(.bytes))]
    NotWholeInstructions { at: Location, which: &'static str, bytes: Vec<u8>, len: usize },

    #[error("poke at {at}: not at an instruction boundary: decoding {function} from {start:#x} steps over it (an instruction runs from {insn_start:#x} to {insn_end:#x})")]
    NotAtBoundary { at: Location, function: String, start: usize, insn_start: usize, insn_end: usize },

    #[error("poke at {at}: the breakpoint strategy can only emulate CALL rel32, JMP rel8/rel32 and NOPs from its trap handler, not {new}; use the stop-machine strategy", new = Hex(.new))]
    NotEmulatable { at: Location, new: Vec<u8> },

    #[error("poke at {at}: on aarch64 only B, BL, NOP and BRK may replace each other while threads run them (Arm ARM, concurrent modification and execution), not {bytes}; use the stop-machine strategy", bytes = Hex(.bytes))]
    NotSwappable { at: Location, bytes: Vec<u8> },
    #[error("poke at {at}: a first-byte poke changes the first byte only, but the expected bytes ({expected}) and the new bytes ({new}) differ after it; use Poke::new for one instruction, or Poke::region with the stop-machine strategy", expected = Hex(.expected), new = Hex(.new))]
    TailChanged { at: Location, expected: Vec<u8>, new: Vec<u8> },

    #[error("poke at {at}: a multi-instruction region needs the stop-machine strategy (rule 1: never let a thread run between instructions that are being combined)")]
    RegionNeedsStopMachine { at: Location },

    #[error("the SIGTRAP handler was replaced by the application (now {found:#x}); textpoke cannot emulate its breakpoints. Call textpoke::text::reinstall_trap_handler() to take it back, chaining to the new handler")]
    TrapHandlerReplaced { found: usize },

    #[error("cannot install the SIGTRAP handler: {source}")]
    TrapInstall { source: std::io::Error },

    #[error("cannot {what}: {source}")]
    Sys { what: &'static str, source: std::io::Error },

    #[error("thread {tid} did not answer signal {signal} within {waited_ms} ms{hint}; the batch was not applied (nothing written, or rolled back)")]
    ThreadUnresponsive { tid: i32, signal: i32, waited_ms: u64, hint: String },

    #[error("thread {tid} stayed stopped strictly inside the poke at {at} (pc {pc:#x}) over {attempts} attempts; nothing was written, try again later")]
    ThreadInsideRegion { tid: i32, pc: usize, at: Location, attempts: u32 },

    #[error("writing {len} byte(s) at {at} failed: {source}{rollback}")]
    WriteFailed { at: Location, len: usize, source: std::io::Error, rollback: String },
}
