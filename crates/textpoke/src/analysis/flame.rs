//! Folded stacks and the SVG flame graph (see the [module
//! documentation](super)).

use super::{escape, walk_thread, AnalysisError, Event, Rebuilder, TraceSet};
use crate::record::FuncId;
use std::collections::HashMap;
use std::io::Write;

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

    fn folded(&self, out: &mut String) {
        let mut path = Vec::new();
        for (n, &w) in self.weight.iter().enumerate().skip(1) {
            if w == 0 {
                continue;
            }
            path.clear();
            let mut at = n as u32;
            while at != 0 {
                let (parent, name) = self.nodes[at as usize];
                path.push(name);
                at = parent;
            }
            for (i, name) in path.iter().rev().enumerate() {
                if i > 0 {
                    out.push(';');
                }
                out.push_str(&self.names[*name as usize]);
            }
            out.push(' ');
            out.push_str(&w.to_string());
            out.push('\n');
        }
    }
}

/// The folded stacks of `set`, one line per distinct call path: frames
/// joined by `;`, a space, the weight — the sum of the self times of the
/// calls on that path in nanoseconds, or for a count-only trace the calls.
/// The second value is the unit (`"ns"` or `"calls"`).
pub fn folded(set: &TraceSet, progress: &mut dyn FnMut(u64)) -> Result<(String, &'static str), AnalysisError> {
    let is_count = |p: &super::Process| p.trace.mode() == crate::record::Mode::Count;
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
    let mut out = String::new();
    tree.folded(&mut out);
    Ok((out, unit))
}

/// Writes an SVG flame graph of `set` to `w` (see [`folded`] for the
/// weights).
pub fn flamegraph<W: Write>(
    set: &TraceSet,
    opts: &FlameOptions,
    w: &mut W,
    progress: &mut dyn FnMut(u64),
) -> Result<(), AnalysisError> {
    let (folded, unit) = folded(set, progress)?;
    let root = set.root();
    if folded.is_empty() {
        let detail = if set.processes.iter().all(|p| p.trace.mode() == crate::record::Mode::Count) {
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
    inferno::flamegraph::from_lines(&mut o, folded.lines(), w).map_err(AnalysisError::Write)
}
