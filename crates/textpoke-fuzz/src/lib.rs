//! Fuzzing textpoke's trace reader and control protocol on stable Rust.
//!
//! cargo-fuzz needs a nightly compiler and cargo-afl would build AFL++'s
//! LLVM pieces; this crate is a stable, in-process, coverage-free fuzzer
//! instead. What it lacks in coverage feedback it makes up in knowing the
//! inputs' structure: it changes JSON as JSON, event files as 64-bit
//! words with their fields, and directories as files of various kinds,
//! and it repairs the metadata (checksums, word counts) after changing
//! the words, so that changes get past the cheap checks into the decoder
//! and the analyses.
//!
//! # The pieces
//!
//! - [`container`]: a whole trace directory in one file (the reader
//!   corpus's format, `fuzz/corpus/reader/*.tpf`);
//! - [`mutate`]: the mutators (trace directories and request lines);
//! - [`check`]: the properties every input must have — no panic, bounded
//!   CPU time and memory per command, errors that name the trace, open and
//!   read agreeing, stacks that nest, well-formed outputs; for request
//!   lines, a request or a one-line error, and round trips;
//! - [`alloc`]: the counting global allocator that measures memory;
//! - [`gen`]: recording real traces with the recorder's API (the seeds, and
//!   the 10 MB trace the bounds are stated for);
//! - [`perfetto`]: the CLI's `dump --perfetto` exporter, its source
//!   compiled into this crate (it lives in the `textpoke` binary crate,
//!   which has no library), so that the fuzzer runs the very code the
//!   command runs;
//! - [`rng`]: a seeded generator, so that a run can be repeated.
//!
//! # The loop
//!
//! The `textpoke-fuzz` binary (see its `--help`) picks an input from its
//! pool (the corpus, the recorded trace if given, and inputs found to do
//! something new), mutates it, writes it out (reader inputs as a
//! directory under `/dev/shm`), checks it, and saves it under the output
//! directory with what was found if a property failed. "Something new" is
//! a new error message shape (the message with its numbers and paths
//! blanked) or a new set of steps that succeeded: the only feedback a
//! coverage-free fuzzer has, and enough to push past each validation step
//! in turn. `fuzz/run.sh` runs both targets for a fixed time;
//! `tests/corpus.rs` replays the committed corpus under `cargo test`.

pub mod alloc;
pub mod check;
pub mod container;
pub mod gen;
pub mod mutate;
#[path = "../../textpoke-cli/src/perfetto.rs"]
pub mod perfetto;
pub mod rng;

/// The shape of an error message: digits and the input's directory
/// blanked, so that messages that differ only in numbers and places count
/// as one behaviour (quoted text is blanked too).
pub fn message_shape(msg: &str, dir: &str) -> String {
    let mut out = String::with_capacity(msg.len().min(200));
    let mut last_digit = false;
    let mut quoted = false;
    let msg = if dir.is_empty() { msg.to_string() } else { msg.replace(dir, "DIR") };
    for c in msg.chars().take(200) {
        if c == '"' {
            quoted = !quoted;
            if quoted {
                out.push_str("\"_\"");
            }
            continue;
        }
        if quoted {
            continue;
        }
        if c.is_ascii_digit() || c.is_ascii_hexdigit() && last_digit {
            if !last_digit {
                out.push('#');
            }
            last_digit = true;
        } else {
            out.push(c);
            last_digit = false;
        }
    }
    out
}
