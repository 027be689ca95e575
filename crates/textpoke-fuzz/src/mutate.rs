//! The mutators: coverage-free, but aware of the structures they change.
//!
//! # Trace directories
//!
//! [`mutate_trace`] applies one to four operations to a copy of an input,
//! each chosen at random (weights in [`mutate_trace`]):
//!
//! - **JSON** (`meta.json`, `counts.json`, a line of `symbols.jsonl`):
//!   parse, pick a node, and change it by its type — a number to 0, 1, -1,
//!   `u64::MAX`, `i64::MIN`, 2^32, 2^53, 2^63, a float, its neighbour or
//!   its double; a string to empty, huge, a path with `..` or `/`, another
//!   file's name, control and bidi characters; a boolean flipped; an array
//!   entry dropped, duplicated, swapped, or repeated a thousand times; an
//!   object field dropped, added, or written twice (a duplicate key);
//!   any node replaced by a value of another type. Semantic variants for
//!   `meta.json`: two threads' files swapped, a thread pointing at another
//!   file of the trace, a thread duplicated as a reused tid.
//! - **Words** of an event file (after its 32-byte header): a word's kind
//!   bits, its delta, depth or function field set to a boundary
//!   (0, the field's maximum, `MAX_DEPTH` ± 1, 2^14 - 1, 2^22 - 1); a
//!   special record header with a chosen type and payload count (0, 1, 2,
//!   3, 4, 255); sync and long records inserted with extreme times and
//!   counts; runs duplicated, removed, swapped; a run rewritten as a
//!   staircase of entries (a deep stack) or as exits of one function
//!   (orphans). Run lengths are log-uniform, from one word to the file.
//! - **Headers**: magic, version, word length, tid, reserved bytes.
//! - **Bytes** of any file: bit flips, bytes set to 0, 0xff, 0x7f, 0x80,
//!   16/32/64-bit fields set to boundaries, truncation, insertion,
//!   deletion, duplication and splicing of chunks (also from another
//!   input of the pool).
//! - **Files**: removed, renamed, replaced by a FIFO, a socket, a
//!   directory or a symbolic link (to a sibling, to itself, to
//!   `/dev/zero`, dangling); junk files added; a copy of the trace added
//!   as a forked child, or a chain of them deeper than the readers follow;
//!   thousands of small threads added.
//!
//! Most word and header changes would only meet the checksum, so after
//! them, and on its own as an operation, [`repair`] makes the metadata
//! agree with the files again (words, checksum, entry and exit counts,
//! first and last times, totals, the recording's time span, missing
//! symbols) — then the changed words reach the decoder and the analyses.
//!
//! An input never grows beyond a size limit (for inputs derived from a
//! 10 MB trace: a quarter more than the trace).
//!
//! # Control lines
//!
//! [`mutate_line`]: bit flips, interesting bytes (NUL, CR, LF, 0xff, a
//! lone UTF-8 lead byte, bidi and zero-width characters), glob syntax
//! (`*`, `**`, `?`, `[`, `[!a-z]`, `{a,{b,c}}`, `\`), verbs and spaces
//! changed, lengths at the limit (4095, 4096, 4097 bytes) and far past it,
//! truncation and splicing.

use crate::container::{Entry, Kind, TraceInput};
use crate::rng::Rng;
use serde_json::{Map, Value};
use textpoke_record::format::{self, SPECIAL_CUT, SPECIAL_LONG, SPECIAL_LOST, SPECIAL_SYNC, THREAD_HEADER_LEN};

/// `trace::MAX_DEPTH`, the deepest recorded depth the reader accepts.
const MAX_DEPTH: u64 = textpoke::trace::MAX_DEPTH as u64;

/// What [`mutate_trace`] did, for the finding's description.
pub type Log = Vec<String>;

/// Interesting 64-bit values.
const WORDS: &[u64] = &[
    0,
    1,
    2,
    3,
    0x7f,
    0x80,
    0xff,
    0xffff,
    (1 << 14) - 1,
    1 << 14,
    (1 << 22) - 1,
    1 << 22,
    (1 << 26) - 1,
    1 << 26,
    (1 << 31) - 1,
    1 << 31,
    u32::MAX as u64,
    1 << 32,
    (1 << 48) - 1,
    1 << 53,
    i64::MAX as u64,
    1 << 63,
    u64::MAX - 1,
    u64::MAX,
];

fn json_numbers(rng: &mut Rng, old: &Value) -> Value {
    let n = old.as_u64().unwrap_or(7);
    match rng.below(16) {
        0 => Value::from(0),
        1 => Value::from(1),
        2 => Value::from(-1),
        3 => Value::from(u64::MAX),
        4 => Value::from(i64::MIN),
        5 => Value::from(i64::MAX),
        6 => Value::from(1u64 << 32),
        7 => Value::from(1u64 << 53),
        8 => Value::from(1u64 << 63),
        9 => serde_json::json!(1.5),
        10 => serde_json::json!(1e300),
        11 => Value::from(n.wrapping_add(1)),
        12 => Value::from(n.wrapping_sub(1)),
        13 => Value::from(n.wrapping_mul(2)),
        14 => Value::from(n / 2),
        _ => Value::from(*rng.pick(WORDS)),
    }
}

fn json_strings(rng: &mut Rng, old: &str, names: &[String]) -> String {
    match rng.below(14) {
        0 => String::new(),
        1 => "x".repeat(rng.len_upto(100_000)),
        2 => "../../x".into(),
        3 => "a/b".into(),
        4 => ".hidden".into(),
        5 => format::META_FILE.into(),
        6 => format::SYMBOLS_FILE.into(),
        7 if !names.is_empty() => rng.pick(names).clone(),
        8 => "\u{1b}[2J\u{202e}\u{200b}\t\r\n\0".into(),
        9 => "tid-1.bin".into(),
        10 => format!("{old}{old}"),
        11 => "/dev/zero".into(),
        12 => "\u{7f}\u{85}é漢".into(),
        _ => {
            let mut s: Vec<char> = old.chars().collect();
            if !s.is_empty() {
                let i = rng.below(s.len());
                s[i] = *rng.pick(&['a', '0', ';', '"', '\\', '\n', 'é']);
            }
            s.into_iter().collect()
        }
    }
}

/// One step into a JSON value.
#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Index(usize),
}

fn paths(v: &Value, here: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    if out.len() > 200_000 {
        return;
    }
    out.push(here.clone());
    match v {
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                here.push(Step::Index(i));
                paths(x, here, out);
                here.pop();
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                here.push(Step::Key(k.clone()));
                paths(x, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

fn at_mut<'v>(v: &'v mut Value, path: &[Step]) -> Option<&'v mut Value> {
    let mut v = v;
    for s in path {
        v = match (s, v) {
            (Step::Key(k), Value::Object(o)) => o.get_mut(k)?,
            (Step::Index(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(v)
}

/// Writes `v` as JSON; the object at `dup` (if any) gets its first key
/// written twice, the second time with `dup_value`.
fn render(v: &Value, here: &mut Vec<usize>, dup: Option<(&[usize], &Value)>, out: &mut String) {
    match v {
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                here.push(i);
                render(x, here, dup, out);
                here.pop();
            }
            out.push(']');
        }
        Value::Object(o) => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::from(k.as_str()).to_string());
                out.push(':');
                here.push(i);
                render(x, here, dup, out);
                here.pop();
                if let Some((p, dv)) = dup {
                    if i == 0 && p == here.as_slice() {
                        out.push(',');
                        out.push_str(&Value::from(k.as_str()).to_string());
                        out.push(':');
                        out.push_str(&dv.to_string());
                    }
                }
            }
            out.push('}');
        }
        _ => out.push_str(&v.to_string()),
    }
}

/// Positions (indices) of a path, for [`render`].
fn index_path(v: &Value, path: &[Step]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut v = v;
    for s in path {
        match (s, v) {
            (Step::Key(k), Value::Object(o)) => {
                out.push(o.keys().position(|x| x == k).unwrap_or(0));
                v = &o[k];
            }
            (Step::Index(i), Value::Array(a)) => {
                out.push(*i);
                v = &a[*i];
            }
            _ => break,
        }
    }
    out
}

/// Mutates a JSON text; `names` are the file names of the trace (for
/// strings). Returns the new text and what was done.
pub fn mutate_json(rng: &mut Rng, text: &[u8], names: &[String]) -> (Vec<u8>, String) {
    let Ok(mut v) = serde_json::from_slice::<Value>(text) else {
        let mut t = text.to_vec();
        let what = mutate_bytes(rng, &mut t, &[]);
        return (t, format!("bytes of invalid JSON: {what}"));
    };
    let mut all = Vec::new();
    paths(&v, &mut Vec::new(), &mut all);
    let path = rng.pick(&all).clone();
    let show = path
        .iter()
        .map(|s| match s {
            Step::Key(k) => k.clone(),
            Step::Index(i) => i.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".");
    if matches!(at_mut(&mut v, &path), Some(Value::Object(o)) if !o.is_empty()) && rng.one_in(4) {
        let idx = index_path(&v, &path);
        let first = at_mut(&mut v, &path).and_then(|o| o.as_object()?.values().next().cloned()).unwrap_or(Value::Null);
        let dv = if rng.one_in(2) { first } else { json_numbers(rng, &first) };
        let mut out = String::new();
        render(&v, &mut Vec::new(), Some((&idx, &dv)), &mut out);
        return (out.into_bytes(), format!("JSON {show}: first key written twice"));
    }
    let node = at_mut(&mut v, &path).expect("a path from paths()");
    let what = match node {
        _ if rng.one_in(10) => {
            *node = match rng.below(5) {
                0 => Value::Null,
                1 => Value::from("7"),
                2 => Value::from(7),
                3 => Value::Array(vec![]),
                _ => Value::Object(Map::new()),
            };
            format!("JSON {show}: replaced by {node}")
        }
        Value::Number(_) => {
            *node = json_numbers(rng, node);
            format!("JSON {show} = {node}")
        }
        Value::String(s) => {
            let new = json_strings(rng, s, names);
            let what = format!("JSON {show} = {:?}", shorten(&new));
            *s = new;
            what
        }
        Value::Bool(b) => {
            *b = !*b;
            format!("JSON {show} = {b}")
        }
        Value::Null => {
            *node = json_numbers(rng, node);
            format!("JSON {show} = {node}")
        }
        Value::Array(a) if a.is_empty() => {
            a.push(Value::from(0));
            format!("JSON {show}: an entry added")
        }
        Value::Array(a) => {
            let i = rng.below(a.len());
            match rng.below(6) {
                0 => {
                    a.remove(i);
                    format!("JSON {show}: entry {i} removed")
                }
                1 => {
                    let x = a[i].clone();
                    a.insert(i, x);
                    format!("JSON {show}: entry {i} duplicated")
                }
                2 => {
                    let j = rng.below(a.len());
                    a.swap(i, j);
                    format!("JSON {show}: entries {i} and {j} swapped")
                }
                3 => {
                    let n = rng.len_upto(2000);
                    let x = a[i].clone();
                    a.extend(std::iter::repeat_n(x, n));
                    format!("JSON {show}: entry {i} repeated {n} times")
                }
                4 => {
                    a.truncate(i);
                    format!("JSON {show}: cut to {i} entries")
                }
                _ => {
                    a.reverse();
                    format!("JSON {show}: reversed")
                }
            }
        }
        Value::Object(o) => {
            if o.is_empty() || rng.one_in(3) {
                o.insert("unknown_field".into(), Value::from(1));
                format!("JSON {show}: a field added")
            } else {
                let k = o.keys().nth(rng.below(o.len())).cloned().unwrap_or_default();
                o.remove(&k);
                format!("JSON {show}: field {k} removed")
            }
        }
    };
    let text = if rng.one_in(2) { serde_json::to_vec_pretty(&v) } else { serde_json::to_vec(&v) };
    (text.unwrap_or_default(), what)
}

fn shorten(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}... ({} bytes)", &s[..i], s.len()),
        None => s.to_string(),
    }
}

/// Byte-level mutation of `data` (`other`: a chunk source for splices).
pub fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) -> String {
    let n = data.len();
    let at = rng.below(n + 1);
    match rng.below(11) {
        0 if n > 0 => {
            let i = rng.below(n);
            let bit = rng.below(8);
            data[i] ^= 1 << bit;
            format!("bit {bit} of byte {i} flipped")
        }
        1 if n > 0 => {
            let i = rng.below(n);
            data[i] = *rng.pick(&[0u8, 0xff, 0x7f, 0x80, 1, 0xfe, b'\n', b'"', b'{', b'9']);
            format!("byte {i} = {:#x}", data[i])
        }
        2 if n >= 8 => {
            let i = rng.below(n - 7);
            let v = *rng.pick(WORDS);
            let width = *rng.pick(&[2usize, 4, 8]);
            data[i..i + width].copy_from_slice(&v.to_le_bytes()[..width]);
            format!("{width} bytes at {i} = {v:#x}")
        }
        3 => {
            data.truncate(at);
            format!("truncated to {at} bytes")
        }
        4 => {
            let len = rng.len_upto(64);
            let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            data.splice(at..at, bytes);
            format!("{len} random bytes inserted at {at}")
        }
        5 if n > 0 => {
            let len = rng.len_upto(n - at.min(n - 1));
            let at = at.min(n - len);
            data.drain(at..at + len);
            format!("{len} bytes removed at {at}")
        }
        6 if n > 0 => {
            let from = rng.below(n);
            let len = rng.len_upto(n - from);
            let chunk = data[from..from + len].to_vec();
            data.splice(at..at, chunk);
            format!("bytes {from}..{} copied to {at}", from + len)
        }
        7 if !other.is_empty() => {
            let from = rng.below(other.len());
            let len = rng.len_upto(other.len() - from);
            let end = (at + len).min(n);
            data.splice(at..end, other[from..from + len].iter().copied());
            format!("bytes {at}..{end} replaced by {len} bytes of another input")
        }
        8 if n > 1 => {
            let from = rng.below(n);
            let len = rng.len_upto(n - from);
            let to = rng.below(n - len + 1);
            let chunk = data[from..from + len].to_vec();
            data[to..to + len].copy_from_slice(&chunk);
            format!("bytes {from}..{} written over {to}", from + len)
        }
        9 => {
            data.push(*rng.pick(&[0u8, b'\n', 0xff]));
            "a byte appended".into()
        }
        _ => {
            data.clear();
            "emptied".into()
        }
    }
}

// ---------------------------------------------------------------------------
// Event files.

fn words_of(body: &[u8]) -> Vec<u64> {
    body.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
}

fn set_field(w: u64, shift: u32, bits: u32, v: u64) -> u64 {
    let mask = ((1u64 << bits) - 1) << shift;
    (w & !mask) | ((v << shift) & mask)
}

/// Mutates the words of an event stream; `funcs` are function ids of the
/// trace's symbol file.
fn mutate_words(rng: &mut Rng, w: &mut Vec<u64>, funcs: &[u64], room: usize) -> String {
    let n = w.len();
    let i = rng.below(n);
    let func = |rng: &mut Rng| -> u64 {
        if !funcs.is_empty() && !rng.one_in(4) {
            *rng.pick(funcs)
        } else {
            let r = rng.next_u64();
            *rng.pick(&[0, 1, (1 << 22) - 1, 1 << 22, u32::MAX as u64, r & 0xffff])
        }
    };
    let depth = |rng: &mut Rng| -> u64 {
        let r = rng.next_u64();
        *rng.pick(&[0, 1, 2, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, (1 << 14) - 1, r & 63])
    };
    let ts = |rng: &mut Rng, near: u64| -> u64 {
        *rng.pick(&[
            0,
            1,
            near,
            near.wrapping_add(1),
            near.wrapping_sub(1),
            near.wrapping_add(1 << 26),
            u64::MAX,
            u64::MAX - 5,
            1 << 63,
        ])
    };
    let near = w.iter().skip(1).copied().find(|&x| x > 1 << 30 && x < 1 << 62).unwrap_or(1 << 40);
    // Deep stacks and long runs half the time: the shapes that cost the
    // analyses the most.
    let deep = |rng: &mut Rng| {
        if rng.one_in(2) {
            rng.range(1, MAX_DEPTH as usize - 1)
        } else {
            rng.len_upto(MAX_DEPTH as usize - 1)
        }
    };
    let long = |rng: &mut Rng, max: usize| if rng.one_in(2) { max } else { rng.len_upto(max) };
    match rng.below(26) {
        0 if n > 0 => {
            let k = rng.below(4) as u64;
            w[i] = (w[i] & !3) | k;
            format!("word {i}: kind {k}")
        }
        1 if n > 0 => {
            let ty = *rng.pick(&[0u8, SPECIAL_SYNC, SPECIAL_LONG, SPECIAL_LOST, SPECIAL_CUT, 5, 63]);
            let cnt = *rng.pick(&[0u8, 1, 2, 3, 4, 255]);
            let r = rng.next_u64();
            let arg = *rng.pick(&[0u64, 1, (1 << 48) - 1, r]);
            w[i] = format::special(ty, cnt, arg);
            format!("word {i}: special type {ty} with {cnt} payload words, argument {arg:#x}")
        }
        2 if n > 0 => {
            let r = rng.next_u64();
            let v = *rng.pick(&[0, 1, (1 << 26) - 1, r]);
            w[i] = set_field(w[i], format::DELTA_SHIFT, format::DELTA_BITS, v);
            format!("word {i}: delta field {v:#x}")
        }
        3 if n > 0 => {
            let d = depth(rng);
            w[i] = set_field(w[i], format::DEPTH_SHIFT, format::DEPTH_BITS, d);
            format!("word {i}: depth field {d}")
        }
        4 if n > 0 => {
            let f = func(rng);
            w[i] = set_field(w[i], format::FUNC_SHIFT, format::FUNC_BITS, f);
            format!("word {i}: function field {f}")
        }
        5 => {
            let (t, lost) = (ts(rng, near), *rng.pick(&[0, 1, 1 << 40, u64::MAX]));
            let d = depth(rng);
            let rec = [format::special(SPECIAL_SYNC, 3, d), t, lost, rng.next_u64() & 7];
            let at = rng.below(n + 1);
            w.splice(at..at, rec);
            format!("sync record at word {at}: time {t:#x}, {lost} lost, depth {d}")
        }
        6 => {
            let kind = rng.range(0, 4) as u64;
            let t = ts(rng, near);
            let (f, d) = (func(rng), depth(rng));
            let mut rec = vec![format::special(SPECIAL_LONG, if kind == 3 { 3 } else { 2 }, kind), t, f | d << 32];
            if kind == 3 {
                rec.push(rng.next_u64());
            }
            let at = rng.below(n + 1);
            w.splice(at..at, rec);
            format!("long record at word {at}: kind {kind}, time {t:#x}, function {f}, depth {d}")
        }
        7 if n > 0 => {
            let len = rng.len_upto((n - i).min(room / 8 + 1));
            let run = w[i..i + len].to_vec();
            let at = rng.below(n + 1);
            w.splice(at..at, run);
            format!("words {i}..{} copied to {at}", i + len)
        }
        8 if n > 0 => {
            let len = rng.len_upto(n - i);
            w.drain(i..i + len);
            format!("words {i}..{} removed", i + len)
        }
        9 if n > 1 => {
            let j = rng.below(n);
            w.swap(i, j);
            format!("words {i} and {j} swapped")
        }
        10 if n > 0 => {
            // A staircase: entries one level deeper each, a deep stack.
            let len = rng.len_upto((n - i).min(MAX_DEPTH as usize + 8));
            let f = func(rng);
            let d0 = rng.below(4) as u64;
            for (k, x) in w[i..i + len].iter_mut().enumerate() {
                *x = format::compact(
                    format::KIND_ENTRY,
                    f as u32 & 0x3f_ffff,
                    (d0 + k as u64).min((1 << 14) - 1) as u32,
                    1000,
                )
                .unwrap_or(*x);
            }
            format!("words {i}..{}: entries of function {f} from depth {d0} down", i + len)
        }
        11 if n > 0 => {
            let len = rng.len_upto(n - i);
            let f = func(rng);
            let d = depth(rng);
            for x in &mut w[i..i + len] {
                *x = format::compact(format::KIND_EXIT, f as u32 & 0x3f_ffff, d as u32, 1000).unwrap_or(*x);
            }
            format!("words {i}..{}: exits of function {f} at depth {d}", i + len)
        }
        12 if n > 0 => {
            let len = rng.len_upto(n - i);
            let d = depth(rng);
            for x in &mut w[i..i + len] {
                if *x & 3 != 0 {
                    *x = set_field(*x, format::DEPTH_SHIFT, format::DEPTH_BITS, d);
                }
            }
            format!("words {i}..{}: every event at depth {d}", i + len)
        }
        13 if n > 0 => {
            w[i] = *rng.pick(WORDS);
            format!("word {i} = {:#x}", w[i])
        }
        14 if n > 0 => {
            let bit = rng.below(64);
            w[i] ^= 1 << bit;
            format!("word {i}: bit {bit} flipped")
        }
        16..=21 if n > 0 => {
            // Deep, fully nested call trees of random functions, one after
            // the other, over a run: long paths, deep indentation.
            let len = long(rng, n - i);
            let depth = deep(rng);
            let mut stack = Vec::new();
            let mut k = 0;
            while k < len {
                let word = if stack.len() < depth && (k + stack.len() + 1 < len) {
                    let f = func(rng) as u32 & 0x3f_ffff;
                    stack.push(f);
                    format::compact(format::KIND_ENTRY, f, stack.len() as u32 - 1, 1000)
                } else if let Some(f) = stack.pop() {
                    format::compact(format::KIND_EXIT, f, stack.len() as u32, 1000)
                } else {
                    break;
                };
                w[i + k] = word.unwrap_or(w[i + k]);
                k += 1;
            }
            format!("words {i}..{}: call trees {depth} deep", i + k)
        }
        22..=24 if n > 0 => {
            // A deep stack, then exits that match none of it (orphans):
            // each one is looked for through the whole stack.
            let len = long(rng, n - i);
            let depth = deep(rng).min(len);
            let f = func(rng) as u32 & 0x3f_ffff;
            for (k, x) in w[i..i + len].iter_mut().enumerate() {
                let word = if k < depth {
                    format::compact(format::KIND_ENTRY, f, k as u32, 1000)
                } else {
                    format::compact(format::KIND_EXIT, f ^ 1, (k % depth) as u32, 1000)
                };
                *x = word.unwrap_or(*x);
            }
            format!("words {i}..{}: a stack {depth} deep, then exits of another function", i + len)
        }
        15 => {
            let what = *rng.pick(&[SPECIAL_LOST, SPECIAL_CUT]);
            let count = *rng.pick(&[0u64, 1, (1 << 48) - 1]);
            let at = rng.below(n + 1);
            w.insert(at, format::special(what, 0, count));
            format!("special record {what} ({count}) inserted at word {at}")
        }
        _ => {
            let len = rng.len_upto(n.max(1));
            w.truncate(n.saturating_sub(len));
            w.push(format::compact(format::KIND_EXIT_VALUE, 1, 0, 1).unwrap_or(3));
            format!("{len} words cut from the end, an exit without its value word last")
        }
    }
}

// ---------------------------------------------------------------------------
// The trace as a whole.

/// The trace directories in an input: `""` for the top one, then
/// `child-…` prefixes (every directory holding a `meta.json`).
pub fn trace_dirs(input: &TraceInput) -> Vec<String> {
    let mut out: Vec<String> = input
        .entries
        .iter()
        .filter_map(|e| e.path.strip_suffix(format::META_FILE))
        .filter(|p| p.is_empty() || p.ends_with('/'))
        .map(|p| p.trim_end_matches('/').to_string())
        .collect();
    if out.is_empty() {
        out.push(String::new());
    }
    out
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// The event files of a trace directory: files named in its metadata, or
/// that start with the thread magic.
fn event_files(input: &TraceInput, dir: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(meta) = input.file(&join(dir, format::META_FILE)).and_then(|m| serde_json::from_slice::<Value>(m).ok())
    {
        for t in meta["threads"].as_array().into_iter().flatten() {
            if let Some(f) = t["file"].as_str() {
                let p = join(dir, f);
                if crate::container::plain_path(&p) && input.file(&p).is_some() && !out.contains(&p) {
                    out.push(p);
                }
            }
        }
    }
    for e in &input.entries {
        if let Kind::File(d) = &e.kind {
            let in_dir = e.path.rsplit_once('/').map_or("", |(d, _)| d) == dir;
            if in_dir && d.starts_with(&format::THREAD_MAGIC) && !out.contains(&e.path) {
                out.push(e.path.clone());
            }
        }
    }
    out
}

fn symbol_ids(input: &TraceInput, dir: &str) -> Vec<u64> {
    let Some(s) = input.file(&join(dir, format::SYMBOLS_FILE)) else { return Vec::new() };
    s.split(|&b| b == b'\n')
        .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
        .filter_map(|v| v["id"].as_u64())
        .take(10_000)
        .collect()
}

/// What a stream holds, decoded leniently (wrapping arithmetic: this must
/// not fail where the reader might).
#[derive(Default)]
struct Scan {
    entries: u64,
    exits: u64,
    first: Option<u64>,
    last: u64,
    min: u64,
    max: u64,
    funcs: std::collections::BTreeSet<u32>,
}

fn scan(words: &[u64]) -> Scan {
    let mut s = Scan { min: u64::MAX, ..Scan::default() };
    let mut time: Option<u64> = None;
    let mut i = 0;
    let event = |s: &mut Scan, kind: u64, func: u32, ts: u64| {
        if kind == 1 {
            s.entries += 1;
        } else {
            s.exits += 1;
        }
        s.first.get_or_insert(ts);
        s.last = ts;
        s.min = s.min.min(ts);
        s.max = s.max.max(ts);
        if s.funcs.len() < 100_000 {
            s.funcs.insert(func);
        }
    };
    while i < words.len() {
        let w = words[i];
        let kind = w & 3;
        if kind != 0 {
            let Some(t) = time else { break };
            let ts = t.wrapping_add(w >> format::DELTA_SHIFT);
            time = Some(ts);
            event(&mut s, kind, ((w >> format::FUNC_SHIFT) & ((1 << format::FUNC_BITS) - 1)) as u32, ts);
            i += if kind == 3 { 2 } else { 1 };
            continue;
        }
        let ty = ((w >> 2) & 0x3f) as u8;
        let len = ((w >> 8) & 0xff) as usize;
        let p = &words[(i + 1).min(words.len())..(i + 1 + len).min(words.len())];
        match ty {
            SPECIAL_SYNC if p.len() >= 3 => time = Some(p[0]),
            SPECIAL_LONG if p.len() >= 2 => {
                let kind = (w >> 16) & 0xff;
                if (1..=3).contains(&kind) {
                    time = Some(p[0]);
                    event(&mut s, kind, p[1] as u32, p[0]);
                }
            }
            0 => break,
            _ => {}
        }
        i += 1 + len;
    }
    s
}

/// Makes the metadata of every trace directory of `input` agree with its
/// files, where it can (see the module docs). `all`: also widen the time
/// span and add missing symbols.
pub fn repair(input: &mut TraceInput, all: bool) {
    for dir in trace_dirs(input) {
        repair_dir(input, &dir, all);
    }
}

fn repair_dir(input: &mut TraceInput, dir: &str, all: bool) {
    let meta_path = join(dir, format::META_FILE);
    let Some(mut meta) = input.file(&meta_path).and_then(|m| serde_json::from_slice::<Value>(m).ok()) else { return };
    let (mut events, mut calls, mut dropped) = (0u64, 0u64, 0u64);
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    let mut funcs = std::collections::BTreeSet::new();
    if let Some(threads) = meta.get_mut("threads").and_then(Value::as_array_mut) {
        for t in threads.iter_mut() {
            let Some(t) = t.as_object_mut() else { continue };
            let file = t.get("file").and_then(Value::as_str).map(|f| join(dir, f));
            if let Some(data) = file.as_deref().and_then(|f| input.file(f)).filter(|d| d.len() >= THREAD_HEADER_LEN) {
                let words = words_of(&data[THREAD_HEADER_LEN..]);
                let h = words.iter().fold(format::CHECKSUM_SEED, |h, &w| format::checksum_step(h, w));
                let s = scan(&words);
                t.insert("words".into(), Value::from(words.len() as u64));
                t.insert("checksum".into(), Value::from(format!("{h:016x}")));
                t.insert("entries".into(), Value::from(s.entries));
                t.insert("exits".into(), Value::from(s.exits));
                if let Some(first) = s.first {
                    t.insert("first_ts".into(), Value::from(first));
                    t.insert("last_ts".into(), Value::from(s.last));
                    lo = lo.min(s.min);
                    hi = hi.max(s.max);
                }
                funcs.extend(s.funcs);
            }
            let n = |k: &str| t.get(k).and_then(Value::as_u64).unwrap_or(0);
            events = events.saturating_add(n("entries").saturating_add(n("exits")));
            calls = calls.saturating_add(n("calls"));
            dropped = dropped.saturating_add(n("lost").saturating_add(n("dropped_nested")));
        }
    }
    if let Some(u) = meta.get("unattributed_drops").and_then(Value::as_object) {
        dropped = u.values().filter_map(Value::as_u64).fold(dropped, u64::saturating_add);
    }
    if let Some(m) = meta.as_object_mut() {
        m.insert("total_events".into(), Value::from(events));
        m.insert("total_calls".into(), Value::from(calls));
        m.insert("total_dropped".into(), Value::from(dropped));
        if all && lo <= hi {
            if m.get("start_ts").and_then(Value::as_u64).is_some_and(|s| s > lo) {
                m.insert("start_ts".into(), Value::from(lo));
            }
            if m.get("end_ts").and_then(Value::as_u64).is_some_and(|e| e < hi) {
                m.insert("end_ts".into(), Value::from(hi));
            }
        }
    }
    input.set_file(&meta_path, serde_json::to_vec_pretty(&meta).unwrap_or_default());
    if all {
        let sym_path = join(dir, format::SYMBOLS_FILE);
        let known: std::collections::BTreeSet<u64> = symbol_ids(input, dir).into_iter().collect();
        if let Some(syms) = input.file_mut(&sym_path) {
            for f in funcs.into_iter().filter(|f| !known.contains(&(*f as u64))).take(1000) {
                let line = serde_json::json!({"id": f, "addr": 4096 + f as u64, "name": format!("fn{f}")});
                if !syms.is_empty() && !syms.ends_with(b"\n") {
                    syms.push(b'\n');
                }
                syms.extend_from_slice(line.to_string().as_bytes());
                syms.push(b'\n');
            }
        }
    }
}

/// Names of the files of the trace directory `dir` (for JSON strings).
fn names_in(input: &TraceInput, dir: &str) -> Vec<String> {
    input
        .entries
        .iter()
        .filter_map(|e| {
            let (d, n) = e.path.rsplit_once('/').unwrap_or(("", &e.path));
            (d == dir).then(|| n.to_string())
        })
        .collect()
}

/// A small thread file of `tid`: a sync record, an entry and an exit.
fn tiny_thread(tid: i32, func: u32, ts: u64) -> Vec<u8> {
    let mut enc = format::Encoder::new();
    let e = |kind, ts| format::Event { kind, func, depth: 0, ts, value: None };
    enc.event(&e(format::KIND_ENTRY, ts));
    enc.event(&e(format::KIND_EXIT, ts + 10));
    [&format::thread_header(tid)[..], &enc.bytes()].concat()
}

/// Changes files as files (see the module docs).
fn mutate_files(rng: &mut Rng, input: &mut TraceInput, dir: &str, room: usize) -> String {
    let n = input.entries.len();
    let i = rng.below(n);
    match rng.below(9) {
        0 if n > 0 => {
            let e = input.entries.remove(i);
            format!("{} removed", e.path)
        }
        1 if n > 0 => {
            let p = input.entries[i].path.clone();
            let name = p.rsplit('/').next().unwrap_or("x").to_string();
            let sibling = names_in(input, dir).get(rng.below(4)).cloned().unwrap_or_else(|| "meta.json".into());
            let kind = match rng.below(8) {
                0 => Kind::Fifo,
                1 => Kind::Dir,
                2 => Kind::Socket,
                3 => Kind::Symlink(name),
                4 => Kind::Symlink("/dev/zero".into()),
                5 => Kind::Symlink("does-not-exist".into()),
                6 => Kind::Symlink("..".into()),
                _ => Kind::Symlink(sibling),
            };
            let what = format!("{p} replaced by {kind:?}");
            input.entries.retain(|e| !e.path.starts_with(&format!("{p}/")));
            if let Some(e) = input.entries.iter_mut().find(|e| e.path == p) {
                e.kind = kind;
            }
            what
        }
        2 if n > 1 => {
            let j = rng.below(n);
            let a = input.entries[i].path.clone();
            let b = input.entries[j].path.clone();
            input.entries[i].path = b.clone();
            input.entries[j].path = a.clone();
            format!("{a} and {b} swapped")
        }
        3 => {
            let names: [&str; 5] = ["tid-999.bin", "junk", "child-x", ".hidden", "meta.json.tmp"];
            let name = join(dir, rng.pick::<&str>(&names));
            let data: Vec<u8> = (0..rng.len_upto(256)).map(|_| rng.next_u64() as u8).collect();
            input.set_file(&name, data);
            format!("{name} added")
        }
        4 if input.size() * 2 < room => {
            // A copy of this trace as a forked child.
            let pid = rng.range(2, 99_999);
            let child = join(dir, &format!("{}{pid}", format::CHILD_DIR_PREFIX));
            let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
            let copies: Vec<Entry> = input
                .entries
                .iter()
                .filter_map(|e| e.path.strip_prefix(&prefix).map(|rest| (rest, e)))
                .filter(|(rest, _)| !rest.starts_with(format::CHILD_DIR_PREFIX))
                .map(|(rest, e)| Entry { path: format!("{child}/{rest}"), kind: e.kind.clone() })
                .collect();
            input.entries.push(Entry { path: child.clone(), kind: Kind::Dir });
            input.entries.extend(copies);
            format!("{child}: a copy of the trace as a forked child")
        }
        5 if input.size() * 4 < room => {
            // Forks within forks, deeper than the readers follow.
            let depth = rng.range(2, 40);
            let meta = input.file(&join(dir, format::META_FILE)).map(<[u8]>::to_vec);
            let mut at = dir.to_string();
            for k in 0..depth {
                at = join(&at, &format!("{}{}", format::CHILD_DIR_PREFIX, 100 + k));
                if let Some(m) = &meta {
                    input.set_file(&join(&at, format::META_FILE), m.clone());
                }
                for f in [format::SYMBOLS_FILE, format::COUNTS_FILE] {
                    if let Some(d) = input.file(&join(dir, f)).map(<[u8]>::to_vec) {
                        input.set_file(&join(&at, f), d);
                    }
                }
            }
            format!("a chain of {depth} forked children under {dir:?} (metadata only)")
        }
        6 => {
            // Many small threads.
            let k = rng.len_upto(4000).min(room / 200 + 1);
            let meta_path = join(dir, format::META_FILE);
            let Some(mut meta) = input.file(&meta_path).and_then(|m| serde_json::from_slice::<Value>(m).ok()) else {
                return "no metadata to add threads to".into();
            };
            let func = symbol_ids(input, dir).first().copied().unwrap_or(0) as u32;
            let ts = meta["start_ts"].as_u64().unwrap_or(0).saturating_add(5);
            let template = meta["threads"].get(0).cloned().unwrap_or(Value::Null);
            let Some(threads) = meta.get_mut("threads").and_then(Value::as_array_mut) else {
                return "no threads array".into();
            };
            for j in 0..k {
                let tid = 1_000_000 + j as i32;
                let file = format!("tid-{tid}.bin");
                input.set_file(&join(dir, &file), tiny_thread(tid, func, ts));
                let mut t = template.clone();
                if let Some(o) = t.as_object_mut() {
                    o.insert("tid".into(), Value::from(tid));
                    o.insert("file".into(), Value::from(file));
                    o.insert("calls".into(), Value::from(1));
                    o.insert("lost".into(), Value::from(0));
                    o.insert("dropped_nested".into(), Value::from(0));
                    o.insert("exited".into(), Value::from(true));
                }
                threads.push(t);
            }
            input.set_file(&meta_path, serde_json::to_vec(&meta).unwrap_or_default());
            repair_dir(input, dir, false);
            format!("{k} small threads added to {dir:?}")
        }
        7 => {
            // A thread duplicated as a reused tid (exited, a second file).
            let meta_path = join(dir, format::META_FILE);
            let Some(mut meta) = input.file(&meta_path).and_then(|m| serde_json::from_slice::<Value>(m).ok()) else {
                return "no metadata".into();
            };
            let Some(threads) = meta.get_mut("threads").and_then(Value::as_array_mut).filter(|t| !t.is_empty()) else {
                return "no threads".into();
            };
            let j = rng.below(threads.len());
            let mut t = threads[j].clone();
            let Some(file) = t["file"].as_str().map(str::to_string) else { return "a thread without file".into() };
            let Some(data) = input.file(&join(dir, &file)).map(<[u8]>::to_vec) else { return "no file".into() };
            if data.len() + input.size() > room {
                return "no room for a reused tid".into();
            }
            let copy = format!("{}-2.bin", file.trim_end_matches(".bin"));
            let Some(o) = t.as_object_mut() else { return "a thread that is not an object".into() };
            o.insert("file".into(), Value::from(copy.clone()));
            o.insert("exited".into(), Value::from(true));
            threads.push(t);
            input.set_file(&join(dir, &copy), data);
            input.set_file(&meta_path, serde_json::to_vec(&meta).unwrap_or_default());
            format!("thread {j} of {dir:?} duplicated as a reused tid ({copy})")
        }
        _ => {
            // Two threads' files swapped in the metadata.
            let meta_path = join(dir, format::META_FILE);
            let Some(mut meta) = input.file(&meta_path).and_then(|m| serde_json::from_slice::<Value>(m).ok()) else {
                return "no metadata".into();
            };
            let Some(threads) = meta.get_mut("threads").and_then(Value::as_array_mut).filter(|t| t.len() > 1) else {
                return "fewer than two threads".into();
            };
            let (a, b) = (rng.below(threads.len()), rng.below(threads.len()));
            let (fa, fb) = (threads[a]["file"].clone(), threads[b]["file"].clone());
            for (i, f) in [(a, fb), (b, fa)] {
                if let Some(o) = threads[i].as_object_mut() {
                    o.insert("file".into(), f);
                }
            }
            input.set_file(&meta_path, serde_json::to_vec(&meta).unwrap_or_default());
            format!("threads {a} and {b} of {dir:?}: files swapped")
        }
    }
}

/// Returns a mutated copy of `input` (at most `room` bytes of files) and
/// what was done; `pool` gives chunks to splice from.
pub fn mutate_trace(rng: &mut Rng, input: &TraceInput, pool: &[&TraceInput], room: usize) -> (TraceInput, Log) {
    let mut out = input.clone();
    let mut log = Log::new();
    for _ in 0..rng.len_upto(4) {
        let dirs = trace_dirs(&out);
        // The top directory half the time: it holds most of the events.
        let dir = if rng.one_in(2) { dirs[0].clone() } else { rng.pick(&dirs).clone() };
        let names = names_in(&out, &dir);
        let what = match rng.below(26) {
            0..=5 => {
                let p = join(&dir, format::META_FILE);
                match out.file(&p) {
                    Some(m) => {
                        let (new, what) = mutate_json(rng, m, &names);
                        out.set_file(&p, new);
                        format!("{p}: {what}")
                    }
                    None => continue,
                }
            }
            6 | 7 => {
                let p = join(&dir, format::COUNTS_FILE);
                let Some(m) = out.file(&p) else { continue };
                let (new, what) = mutate_json(rng, m, &names);
                out.set_file(&p, new);
                format!("{p}: {what}")
            }
            8..=10 => {
                let p = join(&dir, format::SYMBOLS_FILE);
                let Some(s) = out.file(&p) else { continue };
                let mut lines: Vec<Vec<u8>> = s.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
                let i = rng.below(lines.len());
                let what = match rng.below(6) {
                    0 => {
                        let (new, what) = mutate_json(rng, &lines[i], &names);
                        lines[i] = new;
                        what
                    }
                    1 => {
                        lines.remove(i);
                        format!("line {i} removed")
                    }
                    2 => {
                        let l = lines[i].clone();
                        lines.insert(i, l);
                        format!("line {i} duplicated")
                    }
                    3 => {
                        let r = rng.next_u64();
                        let id = *rng.pick(&[0u64, 1 << 22, u32::MAX as u64, r & 0xfff]);
                        let name = if rng.one_in(3) { "n".repeat(rng.len_upto(1 << 20)) } else { "extra".into() };
                        lines
                            .insert(i, serde_json::json!({"id": id, "addr": 1, "name": name}).to_string().into_bytes());
                        format!("a symbol {id} added at line {i}")
                    }
                    4 => {
                        let j = rng.below(lines.len());
                        lines.swap(i, j);
                        format!("lines {i} and {j} swapped")
                    }
                    _ => {
                        let what = mutate_bytes(rng, &mut lines[i], &[]);
                        format!("line {i}: {what}")
                    }
                };
                out.set_file(&p, lines.join(&b'\n'));
                format!("{p}: {what}")
            }
            11..=17 => {
                let files = event_files(&out, &dir);
                if files.is_empty() {
                    continue;
                }
                let p = rng.pick(&files).clone();
                let funcs = symbol_ids(&out, &dir);
                let room_left = room.saturating_sub(out.size());
                let data = out.file_mut(&p).expect("an event file");
                let what = if data.len() < THREAD_HEADER_LEN || rng.one_in(8) {
                    let i = rng.below(THREAD_HEADER_LEN.min(data.len()).max(1));
                    let what = match rng.below(3) {
                        0 if data.len() >= 24 => {
                            let off = *rng.pick(&[8usize, 12, 16, 20]);
                            let v = *rng.pick(&[0u32, 1, 3, 7, 9, u32::MAX, 0x8000_0000]);
                            data[off..off + 4].copy_from_slice(&v.to_le_bytes());
                            format!("header field at {off} = {v:#x}")
                        }
                        1 if i < data.len() => {
                            data[i] ^= 0x20;
                            format!("header byte {i} changed")
                        }
                        _ => {
                            data.truncate(i);
                            format!("cut to {i} bytes")
                        }
                    };
                    format!("{p}: {what}")
                } else {
                    let body = data.split_off(THREAD_HEADER_LEN);
                    let tail = body.len() % 8;
                    let mut words = words_of(&body);
                    let what = if rng.one_in(8) {
                        let mut b = body.clone();
                        let w = mutate_bytes(rng, &mut b, &[]);
                        data.extend_from_slice(&b);
                        w
                    } else {
                        let w = mutate_words(rng, &mut words, &funcs, room_left);
                        data.extend(words.iter().flat_map(|w| w.to_le_bytes()));
                        data.extend_from_slice(&body[body.len() - tail..]);
                        w
                    };
                    format!("{p}: {what}")
                };
                if !rng.one_in(4) {
                    repair(&mut out, !rng.one_in(3));
                    format!("{what}; metadata repaired")
                } else {
                    what
                }
            }
            18 | 19 => {
                if out.entries.is_empty() {
                    continue;
                }
                let i = rng.below(out.entries.len());
                let p = out.entries[i].path.clone();
                let other: Vec<u8> = if pool.is_empty() {
                    Vec::new()
                } else {
                    let o = rng.pick(pool);
                    o.entries.get(rng.below(o.entries.len().max(1))).map_or(Vec::new(), |e| match &e.kind {
                        Kind::File(d) => d[..d.len().min(room / 4)].to_vec(),
                        _ => Vec::new(),
                    })
                };
                let Some(d) = out.file_mut(&p) else { continue };
                let what = mutate_bytes(rng, d, &other);
                format!("{p}: {what}")
            }
            20 | 21 => format!("files: {}", mutate_files(rng, &mut out, &dir, room)),
            22 => {
                repair(&mut out, true);
                "metadata repaired".into()
            }
            23 if !pool.is_empty() => {
                // A whole file of another input.
                let o = rng.pick(pool);
                let Some(e) = o.entries.get(rng.below(o.entries.len().max(1))) else { continue };
                if let Kind::File(d) = &e.kind {
                    if d.len() + out.size() > room {
                        continue;
                    }
                }
                let name = e.path.rsplit('/').next().unwrap_or(&e.path);
                let p = join(&dir, name);
                out.entries.retain(|x| x.path != p);
                out.entries.push(Entry { path: p.clone(), kind: e.kind.clone() });
                format!("{p}: taken from another input")
            }
            _ => {
                let p = join(&dir, format::META_FILE);
                let Some(m) = out.file(&p) else { continue };
                let mut m = m.to_vec();
                let what = mutate_bytes(rng, &mut m, &[]);
                out.set_file(&p, m);
                format!("{p}: {what}")
            }
        };
        log.push(what);
        if out.size() > room {
            log.push(format!("over the size limit ({} > {room} bytes): back to the input", out.size()));
            out = input.clone();
        }
    }
    (out, log)
}

// ---------------------------------------------------------------------------
// Control lines.

/// Returns a mutated copy of a request line; `pool` gives other lines.
pub fn mutate_line(rng: &mut Rng, line: &[u8], pool: &[&[u8]]) -> (Vec<u8>, String) {
    let mut l = line.to_vec();
    let mut log = Vec::new();
    for _ in 0..rng.len_upto(4) {
        let n = l.len();
        let at = rng.below(n + 1);
        let what = match rng.below(12) {
            0..=2 => {
                let other = pool.get(rng.below(pool.len().max(1))).copied().unwrap_or(&[]);
                mutate_bytes(rng, &mut l, other)
            }
            3 => {
                let ins: &[u8] = rng.pick::<&[u8]>(&[
                    b"\0".as_slice(),
                    b"\r",
                    b"\n",
                    b"\r\n",
                    b"\xff",
                    b"\xc3",
                    b"\xe2\x80\xae",
                    b"\xe2\x80\x8b",
                    b"\xf0\x9f\x98",
                    b"\xf4\x90\x80\x80",
                    b"\xed\xa0\x80",
                    b" ",
                    b"\t",
                    b"\x1b[2J",
                ]);
                l.splice(at..at, ins.iter().copied());
                format!("{ins:?} inserted at {at}")
            }
            4 => {
                let g: &[u8] = rng.pick::<&[u8]>(&[
                    b"*".as_slice(),
                    b"**",
                    b"?",
                    b"[",
                    b"]",
                    b"[!a-z]",
                    b"[z-a]",
                    b"{a,{b,c}}",
                    b"{",
                    b"}",
                    b"\\",
                    b"[[:alpha:]]",
                    b"**/",
                    b"{,}",
                    b"[\\]",
                ]);
                l.splice(at..at, g.iter().copied());
                format!("glob {:?} inserted at {at}", String::from_utf8_lossy(g))
            }
            5 => {
                let v: &[u8] = rng.pick::<&[u8]>(&[
                    b"status".as_slice(),
                    b"enable ",
                    b"disable ",
                    b"ENABLE ",
                    b"enable",
                    b"enable  ",
                    b" status",
                    b"status ",
                ]);
                let rest = l.iter().position(|&b| b == b' ').map_or(&l[..0], |i| &l[i + 1..]).to_vec();
                l = [v, &rest[..]].concat();
                format!("verb {:?}", String::from_utf8_lossy(v))
            }
            6 => {
                let r = rng.len_upto(1 << 16);
                let target = *rng.pick(&[4095usize, 4096, 4097, 8192, 1 << 20, r]);
                let fill = *rng.pick(&[b'x', b'*', b'{', b'[', 0xc3]);
                if l.len() < target {
                    l.resize(target, fill);
                }
                format!("filled to {target} bytes with {fill:#x}")
            }
            7 => {
                l.truncate(at);
                format!("cut at {at}")
            }
            8 if !pool.is_empty() => {
                let o = rng.pick(pool);
                let from = rng.below(o.len() + 1);
                l.splice(at..at, o[from..].iter().copied());
                format!("the end of another line inserted at {at}")
            }
            9 => {
                let k = rng.len_upto(64);
                let rep: Vec<u8> = rng.pick(&[b"{a,".as_slice(), b"*a", b"[a-", b"\\"]).repeat(k);
                l.splice(at..at, rep);
                format!("a repeated glob piece ({k} times) at {at}")
            }
            10 => {
                let c: char = char::from_u32(rng.next_u64() as u32 % 0x11_0000).unwrap_or('\u{fffd}');
                let mut b = [0u8; 4];
                l.splice(at..at, c.encode_utf8(&mut b).bytes());
                format!("U+{:04X} inserted at {at}", c as u32)
            }
            _ => {
                l.push(b'\n');
                "newline appended".into()
            }
        };
        log.push(what);
    }
    (l, log.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TraceInput {
        let meta = serde_json::json!({
            "format": "textpoke-trace", "version": 2, "complete": true,
            "start_ts": 100, "end_ts": 200,
            "threads": [{"tid": 5, "file": "tid-5.bin", "words": 0, "entries": 0, "exits": 0, "calls": 1,
                         "lost": 0, "dropped_nested": 0, "checksum": "", "first_ts": 0, "last_ts": 0}],
            "unattributed_drops": {"io": 2}, "total_events": 0, "total_calls": 0, "total_dropped": 0
        });
        let mut t = TraceInput::default();
        t.set_file("meta.json", serde_json::to_vec(&meta).unwrap());
        t.set_file("symbols.jsonl", b"{\"id\":1,\"addr\":1,\"name\":\"a\"}\n".to_vec());
        t.set_file("tid-5.bin", tiny_thread(5, 7, 150));
        t
    }

    #[test]
    fn repair_makes_the_metadata_agree() {
        let mut t = sample();
        repair(&mut t, true);
        let m: Value = serde_json::from_slice(t.file("meta.json").unwrap()).unwrap();
        let th = &m["threads"][0];
        assert_eq!(th["words"], 6); // a sync record and two compact events
        assert_eq!((th["entries"].as_u64(), th["exits"].as_u64()), (Some(1), Some(1)));
        assert_eq!((th["first_ts"].as_u64(), th["last_ts"].as_u64()), (Some(150), Some(160)));
        let body = words_of(&t.file("tid-5.bin").unwrap()[THREAD_HEADER_LEN..]);
        let h = body.iter().fold(format::CHECKSUM_SEED, |h, &w| format::checksum_step(h, w));
        assert_eq!(th["checksum"], format!("{h:016x}"));
        assert_eq!(
            (m["total_events"].as_u64(), m["total_calls"].as_u64(), m["total_dropped"].as_u64()),
            (Some(2), Some(1), Some(2))
        );
        let syms = String::from_utf8(t.file("symbols.jsonl").unwrap().to_vec()).unwrap();
        assert!(syms.contains("\"id\":7"), "the missing symbol 7 is added: {syms}");
    }

    #[test]
    fn duplicate_keys_are_written() {
        let mut rng = Rng::new(1);
        let mut seen = false;
        for _ in 0..200 {
            let (text, what) = mutate_json(&mut rng, br#"{"a":{"b":1},"c":2}"#, &[]);
            if what.contains("written twice") {
                let s = String::from_utf8(text).unwrap();
                assert!(s.matches("\"a\"").count() == 2 || s.matches("\"b\"").count() == 2, "{s}");
                seen = true;
            }
        }
        assert!(seen);
    }

    #[test]
    fn mutations_are_deterministic_and_bounded() {
        let base = sample();
        let run = |seed| {
            let mut rng = Rng::new(seed);
            (0..50).map(|_| mutate_trace(&mut rng, &base, &[], 1 << 20)).collect::<Vec<_>>()
        };
        let (a, b) = (run(9), run(9));
        assert_eq!(a, b);
        assert!(a.iter().all(|(t, _)| t.size() <= 1 << 20));
        assert!(a.iter().any(|(t, _)| *t != base));
    }
}
