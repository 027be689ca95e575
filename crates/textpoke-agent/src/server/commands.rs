//! The control socket's requests, answered (the protocol is in
//! [`textpoke_control`]): `status` reports what the agent traces and
//! what the recorder wrote; `enable GLOB` and `disable GLOB` append a
//! filter rule and bring the recording op's filter up to date; the
//! `patch-*` requests are live patching's (`crate::patch`).
//!
//! Each request takes the agent's lock for as long as it is answered; the
//! agent thread serves the connections (`clients`) and calls [`handle`]
//! for each complete request line.

use crate::{fail, getpid, update_filter, Agent, Phase, AGENT};
use textpoke::trace::Tracer;
use textpoke_control::{self as control, Reply, Request};
use textpoke_record as record;

/// Answers one request.
pub(super) fn handle(req: Request) -> Reply {
    let req = match req {
        // Live patching needs no recording agent (`crate::patch`).
        Request::Patch(verb) => return crate::patch::handle(verb),
        r => r,
    };
    let mut g = AGENT.lock();
    let Some(agent) = g.as_mut() else {
        return Reply::error("the agent is not loaded");
    };
    match req {
        Request::Status => status(agent),
        Request::Enable(glob) => change(agent, true, &glob),
        Request::Disable(glob) => change(agent, false, &glob),
        Request::Patch(_) => unreachable!("answered above"),
    }
}

fn status(agent: &mut Agent) -> Reply {
    let meta_path = agent.dir.join(record::format::META_FILE);
    if agent.phase == Phase::Recording {
        let _ = record::flush_active(); // writes the metadata read below
    }
    let meta: Option<record::format::Meta> =
        std::fs::read(&meta_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let process = std::fs::read_to_string("/proc/self/comm").map(|s| s.trim_end().to_owned()).unwrap_or_default();
    let mode = if agent.config.count_only { "count" } else { "record" };
    let traced_sites = inline_sites();
    let mut r = Reply::ok()
        .field("pid", getpid())
        .field("process", process)
        .field("state", agent.phase.name())
        .field("mode", mode)
        .field("dir", agent.dir.display())
        .field("functions", agent.functions)
        .field("traced", agent.traced)
        .field("sites", traced_sites.0)
        .field("inline", traced_sites.1)
        .field("calls", meta.as_ref().map_or(0, |m| m.total_calls))
        .field("events", meta.as_ref().map_or(0, |m| m.total_events))
        .field("dropped", meta.as_ref().map_or(0, |m| m.total_dropped));
    for rule in agent.rules.iter() {
        r = r.field("rule", rule.text());
    }
    r
}

/// Sites traced now, and how many of them record in generated code (the
/// count and graph trampolines) rather than through a callback: fewer
/// than all means the cheap path is off for some (a body site, an agent
/// loaded with dynamic TLS).
pub(crate) fn inline_sites() -> (usize, usize) {
    use textpoke::trace::TrampolineKind;
    let functions = Tracer::global().functions();
    let traced = functions.iter().filter(|f| f.trampoline != TrampolineKind::None);
    let inline =
        |f: &&textpoke::trace::FunctionInfo| matches!(f.trampoline, TrampolineKind::Count | TrampolineKind::Graph);
    (traced.clone().count(), traced.filter(inline).count())
}

fn change(agent: &mut Agent, enable: bool, glob: &str) -> Reply {
    if agent.phase != Phase::Recording {
        return Reply::error(format!("not recording ({}): nothing to change", agent.phase.name()));
    }
    let rule = match crate::rules::Rule::new(enable, glob) {
        Ok(r) => r,
        Err(e) => return Reply::error(e.to_string()),
    };
    let names: std::collections::BTreeSet<String> =
        Tracer::global().functions().iter().map(|f| f.function.to_string()).collect();
    if !names.iter().any(|n| rule.matches(n)) {
        let mut r = Reply::error(format!("no traceable function matches {glob:?}"));
        for n in control::close_names(glob, names.iter().map(String::as_str), 5) {
            r = r.field("hint", n);
        }
        return r;
    }
    agent.rules.push(rule);
    if let Err(e) = update_filter(agent) {
        let msg = format!("cannot change what is traced: {e}");
        fail(agent, &msg);
        return Reply::error(msg);
    }
    Reply::ok().field("traced", agent.traced).field("functions", agent.functions)
}
