//! Folded stacks and the SVG flame graph (see the [module
//! documentation](super)).
//!
//! # Bounds
//!
//! The call-path tree has at most one node per entry, but its folded text
//! repeats each path whole on its line: it grows with the number of paths
//! times their depth, and deep stacks make it quadratic (a 5,000-level
//! recursion is 12.5 million frame names). So:
//!
//! - [`folded_to`] streams the lines, holding only the tree, and refuses
//!   with [`AnalysisError::TooBig`] when the text would pass
//!   [`MAX_FOLDED_BYTES`] (it knows beforehand: each node's path length
//!   is its parent's plus its name);
//! - [`flamegraph`] draws from the lines that can be seen. `inferno`
//!   leaves out frames narrower than 1/10,000 of the width; here a path
//!   lighter than half that gives its weight to its caller's line
//!   (children first), and a path that keeps its line keeps all the
//!   weight under it, so every frame that is drawn has its width to
//!   within 1/20,000. That leaves at most 20,000 lines besides the
//!   outermost frames'. If their text would still pass its budget (stacks
//!   thousands of levels deep) — twice the trace's event bytes, at least
//!   1 MiB and at most [`MAX_FLAME_TEXT`], so that a small trace stays
//!   small — the threshold doubles until it does not, and the graph's
//!   subtitle says how narrow a frame had to be to be left out.

use super::{escape, walk_thread, AnalysisError, Event, Rebuilder, TraceSet};
use std::collections::HashMap;
use std::io::Write;
use textpoke_record::FuncId;

/// The most bytes of folded stacks [`folded_to`] writes.
pub const MAX_FOLDED_BYTES: u64 = 256 << 20;

/// The most bytes of folded stacks a flame graph is drawn from (see the
/// module docs for the budget of a smaller trace).
pub const MAX_FLAME_TEXT: u64 = 32 << 20;

/// A path lighter than the total over this gives its weight to its
/// caller in a flame graph: half of what `inferno` draws (frames narrower
/// than 0.01 % of the width are left out).
const FLAME_RESOLUTION: u64 = 20_000;

/// How to draw the flame graph.
#[derive(Clone, Debug, Default)]
pub struct FlameOptions {
    /// The title at the top of the SVG (default: from the trace).
    pub title: Option<String>,
}

/// A prefix tree of call paths: node 0 is the root (no frame).
struct Tree {
    /// `(parent, frame name index)` of each node but the root.
    nodes: Vec<(u32, u32)>,
    weight: Vec<u64>,
    children: HashMap<(u32, u32), u32>,
    /// Frame names, interned.
    names: Vec<String>,
    name_ids: HashMap<String, u32>,
}

impl Tree {
    fn new() -> Tree {
        Tree {
            nodes: vec![(0, 0)],
            weight: vec![0],
            children: HashMap::new(),
            names: Vec::new(),
            name_ids: HashMap::new(),
        }
    }

    fn intern(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.name_ids.get(name) {
            return i;
        }
        // Folded lines separate frames with ';', end with " count" and a
        // newline, and are read by people and by inferno's XML writer
        // (which does not escape control characters): escaped, ';' as ':'.
        let clean = escape(name).replace(';', ":");
        let clean = if clean.is_empty() { "?".to_string() } else { clean };
        let i = self.names.len() as u32;
        self.names.push(clean);
        self.name_ids.insert(name.to_string(), i);
        i
    }

    fn child(&mut self, parent: u32, name: u32) -> u32 {
        if let Some(&n) = self.children.get(&(parent, name)) {
            return n;
        }
        let n = self.nodes.len() as u32;
        self.nodes.push((parent, name));
        self.weight.push(0);
        self.children.insert((parent, name), n);
        n
    }

    /// Bytes of each node's path (`a;b;c`). A node comes after its
    /// parent, so one pass does.
    fn path_bytes(&self) -> Vec<u64> {
        let mut bytes = vec![0u64; self.nodes.len()];
        for n in 1..self.nodes.len() {
            let (parent, name) = self.nodes[n];
            let own = self.names[name as usize].len() as u64;
            bytes[n] = if parent == 0 { own } else { bytes[parent as usize] + 1 + own };
        }
        bytes
    }

    /// Frames on a node's path.
    fn depth(&self, mut n: usize) -> usize {
        let mut d = 0;
        while n != 0 {
            n = self.nodes[n].0 as usize;
            d += 1;
        }
        d
    }

    /// The weights with every path lighter than `t` given to its caller,
    /// children first; the outermost frames keep theirs (see the module
    /// docs).
    fn coarse(&self, t: u64) -> Vec<u64> {
        let mut carry = self.weight.clone();
        for n in (1..self.nodes.len()).rev() {
            let parent = self.nodes[n].0 as usize;
            if carry[n] < t && parent != 0 {
                carry[parent] = carry[parent].saturating_add(carry[n]);
                carry[n] = 0;
            }
        }
        carry
    }

    /// Writes a line per node of non-zero weight in `weights`.
    fn write_folded(&self, weights: &[u64], w: &mut dyn Write) -> std::io::Result<()> {
        let (mut path, mut line) = (Vec::new(), String::new());
        for (n, &weight) in weights.iter().enumerate().skip(1) {
            if weight == 0 {
                continue;
            }
            path.clear();
            let mut at = n as u32;
            while at != 0 {
                let (parent, name) = self.nodes[at as usize];
                path.push(name);
                at = parent;
            }
            line.clear();
            for (i, name) in path.iter().rev().enumerate() {
                if i > 0 {
                    line.push(';');
                }
                line.push_str(&self.names[*name as usize]);
            }
            line.push(' ');
            line.push_str(&weight.to_string());
            line.push('\n');
            w.write_all(line.as_bytes())?;
        }
        Ok(())
    }
}

/// Bytes of the folded text of `weights` (`paths`: [`Tree::path_bytes`]).
fn text_bytes(weights: &[u64], paths: &[u64]) -> u64 {
    let digits = |w: u64| w.checked_ilog10().unwrap_or(0) as u64 + 1;
    weights.iter().zip(paths).skip(1).filter(|(w, _)| **w > 0).map(|(&w, &p)| p + 2 + digits(w)).sum()
}

/// Writes the folded stacks of `set` to `w`, one line per distinct call
/// path: frames joined by `;`, a space, the weight — the sum of the self
/// times of the calls on that path in nanoseconds, or for a count-only
/// trace the calls. Returns the unit (`"ns"` or `"calls"`). Refuses
/// ([`AnalysisError::TooBig`]) a text over [`MAX_FOLDED_BYTES`].
pub fn folded_to(
    set: &TraceSet,
    w: &mut dyn Write,
    progress: &mut dyn FnMut(u64),
) -> Result<&'static str, AnalysisError> {
    let (tree, unit) = stack_tree(set, progress)?;
    let paths = tree.path_bytes();
    let bytes = text_bytes(&tree.weight, &paths);
    if bytes > MAX_FOLDED_BYTES {
        let lines = tree.weight.iter().skip(1).filter(|&&w| w > 0).count();
        let depth = (1..tree.nodes.len()).map(|n| tree.depth(n)).max().unwrap_or(0);
        return Err(AnalysisError::TooBig {
            dir: set.root().dir().to_path_buf(),
            what: format!(
                "its folded stacks would be {} MiB ({lines} paths, up to {depth} frames deep), more than the {} MiB \
                 written; `textpoke dump --flamegraph` draws them (leaving out what is too narrow to see), \
                 `textpoke dump --perfetto` keeps every call",
                bytes >> 20,
                MAX_FOLDED_BYTES >> 20
            ),
        });
    }
    tree.write_folded(&tree.weight, w).map_err(AnalysisError::Write)?;
    Ok(unit)
}

/// The folded stacks of `set` as a string (see [`folded_to`]); the second
/// value is the unit (`"ns"` or `"calls"`).
pub fn folded(set: &TraceSet, progress: &mut dyn FnMut(u64)) -> Result<(String, &'static str), AnalysisError> {
    let mut text = Vec::new();
    let unit = folded_to(set, &mut text, progress)?;
    // Names are strings, escaped: the text is UTF-8.
    Ok((String::from_utf8_lossy(&text).into_owned(), unit))
}

/// The call-path tree of `set` and its weights' unit.
fn stack_tree(set: &TraceSet, progress: &mut dyn FnMut(u64)) -> Result<(Tree, &'static str), AnalysisError> {
    let is_count = |p: &super::Process| p.trace.mode() == textpoke_record::Mode::Count;
    let counts_only = set.processes.iter().all(is_count);
    let mixed = !counts_only && set.processes.iter().any(is_count);
    let unit = if counts_only { "calls" } else { "ns" };
    let mut tree = Tree::new();
    let labelled = set.processes.len() > 1;
    for p in &set.processes {
        let trace = &p.trace;
        let root = if labelled {
            let label = tree.intern(&p.label());
            tree.child(0, label)
        } else {
            0
        };
        if is_count(p) {
            let counts = trace.counts();
            if mixed {
                // Calls and nanoseconds do not add up: leave this process
                // out rather than draw a wrong graph.
                continue;
            }
            for &(f, n) in counts {
                let name = tree.intern(trace.name(f));
                let node = tree.child(root, name);
                tree.weight[node as usize] += n;
            }
            continue;
        }
        let mut names: HashMap<FuncId, u32> = HashMap::new();
        let mut rb = Rebuilder::new(trace.clock());
        let unknown = tree.intern("[callers unknown: events lost]");
        for t in trace.threads() {
            // The stack of nodes; its base is the root, or after a gap a
            // frame saying the callers are not known.
            let mut stack: Vec<u32> = vec![root];
            walk_thread(trace, t, &mut rb, progress, &mut |e| match e {
                Event::Enter { func, .. } => {
                    let name = *names.entry(func).or_insert_with(|| tree.intern(trace.name(func)));
                    let parent = *stack.last().unwrap_or(&root);
                    let node = tree.child(parent, name);
                    stack.push(node);
                }
                Event::Leave(c) => {
                    // Enter/Leave nest: the top is this call's node. A call
                    // cut by a gap has no time: no weight.
                    if stack.len() > 1 {
                        let node = stack.pop().unwrap_or(root);
                        tree.weight[node as usize] = tree.weight[node as usize].saturating_add(c.self_ns);
                    }
                }
                Event::Gap { level, .. } => {
                    stack.truncate(1);
                    if level > 0 {
                        let node = tree.child(root, unknown);
                        stack.push(node);
                    }
                }
                Event::OrphanExit { .. } | Event::Cut { .. } => {}
            })?;
        }
    }
    Ok((tree, unit))
}

/// Writes an SVG flame graph of `set` to `w` (see [`folded`] for the
/// weights).
pub fn flamegraph<W: Write>(
    set: &TraceSet,
    opts: &FlameOptions,
    w: &mut W,
    progress: &mut dyn FnMut(u64),
) -> Result<(), AnalysisError> {
    let (tree, unit) = stack_tree(set, progress)?;
    let root = set.root();
    let total = tree.weight.iter().fold(0u64, |t, &w| t.saturating_add(w));
    if total == 0 {
        let detail = if set.processes.iter().all(|p| p.trace.mode() == textpoke_record::Mode::Count) {
            " (no function was counted)".to_string()
        } else {
            " with a measurable self time (no completed calls)".to_string()
        };
        return Err(AnalysisError::Empty { dir: root.dir().to_path_buf(), detail });
    }
    let mut o = inferno::flamegraph::Options::default();
    let title = opts.title.clone().unwrap_or_else(|| {
        let m = root.meta();
        if unit == "calls" {
            format!("{} [pid {}]: calls (count-only trace)", m.process_name, m.pid)
        } else {
            format!("{} [pid {}]: self time", m.process_name, m.pid)
        }
    });
    o.title = escape(&title).into_owned();
    o.count_name = unit.to_string();
    o.name_type = "Function:".to_string();
    // The lines that can be seen, within the text budget (module docs).
    let paths = tree.path_bytes();
    let budget = set.total_words().saturating_mul(16).clamp(1 << 20, MAX_FLAME_TEXT);
    let fine = (total / FLAME_RESOLUTION).max(1);
    let mut t = fine;
    let mut weights = tree.coarse(t);
    while t < total && text_bytes(&weights, &paths) > budget {
        t = t.saturating_mul(2).min(total);
        weights = tree.coarse(t);
    }
    if t > fine {
        o.subtitle = Some(format!(
            "paths under {:.3}% of the width left out (drawn in their callers): too many, too deep stacks to draw whole",
            t as f64 * 100.0 / total as f64
        ));
    }
    let mut text = Vec::new();
    tree.write_folded(&weights, &mut text).map_err(AnalysisError::Write)?;
    let text = String::from_utf8_lossy(&text);
    let mut svg = Vec::new();
    inferno::flamegraph::from_lines(&mut o, text.lines(), &mut svg).map_err(AnalysisError::Write)?;
    let label = match &set.processes[..] {
        [p] => format!("all: {}", p.label()),
        ps => format!("all: {} processes", ps.len()),
    };
    let svg = label_root(svg, total, unit, &escape(&label));
    w.write_all(&svg).map_err(AnalysisError::Write)
}

/// Writes `label` on the root frame of an SVG drawn by inferno, which
/// leaves it blank (flamegraph.pl writes "all" there), and in its title,
/// which the SVG's script shows on the frame after a zoom. The root is the
/// frame titled `all (TOTAL UNIT, 100%)`: the first `<title>` of the
/// drawing, with its `<text>` element after it. An SVG not drawn that way
/// is returned as it is.
fn label_root(svg: Vec<u8>, total: u64, unit: &str, label: &str) -> Vec<u8> {
    let title = format!("<title>all ({} {unit}, 100%)</title>", thousands(total));
    let Some(at) = find(&svg, title.as_bytes(), 0) else { return svg };
    let after = at + title.len();
    let Some(open) = find(&svg, b"<text ", after) else { return svg };
    let Some(close) = find(&svg, b"></text>", open) else { return svg };
    // Only the root's own text: no other element between its title and it.
    if svg[after..open].windows(7).any(|w| w == b"<title>") {
        return svg;
    }
    let label = xml_text(label);
    let mut out = Vec::with_capacity(svg.len() + 2 * label.len());
    out.extend_from_slice(&svg[..at]);
    out.extend_from_slice(format!("<title>{label} ({} {unit}, 100%)</title>", thousands(total)).as_bytes());
    out.extend_from_slice(&svg[after..close + 1]);
    out.extend_from_slice(label.as_bytes());
    out.extend_from_slice(&svg[close + 1..]);
    out
}

/// The first place of `needle` in `hay` at or after `from`.
fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|i| i + from)
}

/// `n` with thousands separators, as inferno writes sample counts
/// (`116,619`).
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() * 4 / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `s` as XML character data.
fn xml_text(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
