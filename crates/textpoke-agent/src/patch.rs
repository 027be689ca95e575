//! Live patching in the agent (`textpoke patch`, issue 12): the `patch-*`
//! requests (the protocol is in [`textpoke_control`]), answered for the
//! control socket (a program under `textpoke record`, or attached by
//! `textpoke record -p`) and for a patch session (an agent injected by
//! `textpoke patch`, see `attach`), and the thread that drives a
//! transition.
//!
//! # Answered at once
//!
//! Every request is answered without waiting for threads: the control
//! socket is served by the agent thread, which must never block (an
//! `_exit` may be waiting for it). `patch-load` loads the patch object
//! (`textpoke::live::object::load`: `dlopen` of the path as the target
//! sees it, the records, symbol resolution, build-ids), applies it
//! (`Patcher::apply`: every target's site goes to its transition stub)
//! and starts the live-patch thread; the client then polls `patch-done`.
//!
//! # The live-patch thread
//!
//! `textpoke-live` drives the transition in progress
//! (`Patcher::wait`: outside checks of blocked threads, the checkpoint op
//! for busy ones) until it completes, by itself or by `patch-force`, or is
//! reverted; it notes each completion for `patch-done` and ends as soon as
//! no transition is in progress, after stopping the tracer's reclaimer
//! thread unless a recording needs it: no thread of textpoke's stays while
//! nothing is pending (a program under `textpoke record` keeps its agent
//! thread and reclaimer, as it did before). A transition left pending when `textpoke patch`
//! timed out is driven on, whether or not a client is connected.
//!
//! # Completions
//!
//! Each completion gets a sequence number; the reply that starts a
//! transition gives the number the next completion will have (`seq`), and
//! `patch-done ID SEQ` looks for a completion of patch `ID` numbered
//! `SEQ` or later, so that an earlier completion of the same patch (its
//! patching, when a revert is awaited) is not taken for the one awaited.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use textpoke::live::{Completed, LiveError, PatchId, PatchState, Patcher};
use textpoke_control::{PatchVerb, Reply};

/// How many completions are kept for `patch-done`.
const KEPT: usize = 64;
/// How long one `Patcher::wait` of the live-patch thread lasts before it
/// looks again whether it is still needed.
const DRIVE_SLICE: Duration = Duration::from_millis(200);

/// The completions noted, with their sequence numbers.
struct Log {
    next: u64,
    done: VecDeque<(u64, Completed)>,
}

static LOG: Mutex<Log> = Mutex::new(Log { next: 0, done: VecDeque::new() });

/// The live-patch thread runs (or is being started).
static DRIVING: AtomicBool = AtomicBool::new(false);

fn log() -> std::sync::MutexGuard<'static, Log> {
    LOG.lock().unwrap_or_else(|e| e.into_inner())
}

/// Notes a completion.
fn note(c: Completed) {
    let mut g = log();
    let seq = g.next;
    g.next += 1;
    if g.done.len() == KEPT {
        g.done.pop_front();
    }
    g.done.push_back((seq, c));
}

/// The sequence number the next completion will have.
fn next_seq() -> u64 {
    log().next
}

/// Answers one `patch-*` request.
pub(crate) fn handle(verb: PatchVerb) -> Reply {
    match verb {
        PatchVerb::Load(path) => load(Path::new(&path)),
        PatchVerb::Revert(id) => revert(id.map(PatchId)),
        PatchVerb::Done { id, seq } => done(PatchId(id), seq),
        PatchVerb::Report => report(),
        PatchVerb::Force => force(),
        PatchVerb::List => list(),
        PatchVerb::Nudge(ms) => {
            // The opt-in nudge of the transitions driven from now on.
            Patcher::global().set_nudge(ms.map(Duration::from_millis));
            Reply::ok().field("nudge", ms.map_or_else(|| "off".to_string(), |ms| ms.to_string()))
        }
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn load(path: &Path) -> Reply {
    let t0 = Instant::now();
    let p = Patcher::global();
    if let Some(t) = p.transition() {
        // Refused before the dlopen: its constructors would run for nothing.
        return Reply::error(LiveError::Busy { id: t.patch, name: t.name }.to_string());
    }
    let desc = match textpoke::live::object::load(path) {
        Ok(d) => d,
        Err(e) => return Reply::error(e.to_string()),
    };
    let name = desc.name.clone();
    let replace = desc.replace;
    let functions: Vec<String> = desc.funcs.iter().map(|f| f.name.clone()).collect();
    let seq = next_seq();
    // A refused apply drops the description, and with it the handle:
    // the object is closed again.
    let id = match p.apply(desc) {
        Ok(id) => id,
        Err(e) => return Reply::error(e.to_string()),
    };
    drive();
    let mut r = Reply::ok().field("id", id).field("name", name).field("replace", yes(replace));
    for f in functions {
        r = r.field("function", f);
    }
    r.field("seq", seq).field("load-us", t0.elapsed().as_micros())
}

fn revert(id: Option<PatchId>) -> Reply {
    let p = Patcher::global();
    let reversal = p.transition().is_some();
    let seq = next_seq();
    match p.revert(id) {
        Ok(id) => {
            drive();
            let name = p.patches().into_iter().find(|i| i.id == id).map(|i| i.name).unwrap_or_default();
            Reply::ok().field("id", id).field("name", name).field("seq", seq).field("reversal", yes(reversal))
        }
        Err(e) => Reply::error(e.to_string()),
    }
}

fn done(id: PatchId, seq: u64) -> Reply {
    // Looked at before the log: the live-patch thread notes a completion
    // before it ends, so a completion not in the log below was either
    // made after these looks, or made by a thread still running then.
    let driving = DRIVING.load(Ordering::Acquire);
    let known = Patcher::global().patches().iter().any(|i| i.id == id);
    let g = log();
    if let Some((_, c)) = g.done.iter().find(|(s, c)| *s >= seq && c.patch == id) {
        return Reply::ok()
            .field("state", "complete")
            .field("direction", if c.state == PatchState::Enabled { "patched" } else { "reverted" })
            .field("took-us", c.took.as_micros())
            .field("forced", yes(c.forced));
    }
    if seq > g.next {
        return Reply::error(format!("no completion {seq} can be awaited yet (the next is {})", g.next));
    }
    drop(g);
    if !known && !driving && Patcher::global().transition().is_none() {
        return Reply::error(format!("patch {id} is not applied and no transition of it was awaited"));
    }
    // In transition, or completed a moment ago by the live-patch thread,
    // which notes it next.
    Reply::ok().field("state", "pending")
}

fn direction(s: PatchState) -> &'static str {
    if s == PatchState::Patching {
        "patching"
    } else {
        "unpatching"
    }
}

/// One round of the transition on the calling thread, which checks
/// itself: a session's thread, busy answering, would otherwise be
/// reported (and forced) as a running thread that has not switched.
fn check_self() {
    if let Ok(c) = Patcher::global().wait(Duration::ZERO) {
        note(c);
    }
}

fn report() -> Reply {
    check_self();
    let Some(t) = Patcher::global().transition() else {
        return Reply::ok().field("transition", "none");
    };
    let mut r = Reply::ok()
        .field("transition", "pending")
        .field("patch", t.patch)
        .field("name", &t.name)
        .field("direction", direction(t.direction))
        .field("reversals", t.reversals)
        .field("elapsed-ms", t.elapsed.as_millis());
    for th in &t.pending {
        r = r.field("thread", th);
    }
    r
}

fn force() -> Reply {
    check_self();
    let p = Patcher::global();
    let Some(t) = p.transition() else {
        return Reply::error(LiveError::NoTransition.to_string());
    };
    match p.force() {
        Ok(threads) => {
            let c = Completed {
                patch: t.patch,
                state: if t.direction == PatchState::Patching { PatchState::Enabled } else { PatchState::Unpatching },
                took: t.elapsed,
                forced: true,
            };
            note(c);
            let mut r = Reply::ok()
                .field("patch", t.patch)
                .field("direction", direction(t.direction))
                .field("took-us", t.elapsed.as_micros());
            for th in threads {
                r = r.field("forced", th);
            }
            r
        }
        // Completed by the live-patch thread meanwhile (it noted it).
        Err(LiveError::NoTransition) => Reply::ok()
            .field("patch", t.patch)
            .field("direction", direction(t.direction))
            .field("took-us", t.elapsed.as_micros()),
        Err(e) => Reply::error(e.to_string()),
    }
}

fn list() -> Reply {
    let mut r = Reply::ok();
    for p in Patcher::global().patches() {
        let state = match p.state {
            PatchState::Patching => "patching",
            PatchState::Enabled => "enabled",
            PatchState::Unpatching => "unpatching",
        };
        r = r.field(
            "patch",
            format!("{} {state} {} {} {} {}", p.id, yes(p.forced), yes(p.replace), p.functions.join(","), p.name),
        );
    }
    r
}

// ---------------------------------------------------------------------------
// The live-patch thread.

/// Starts the live-patch thread unless it runs.
fn drive() {
    // AcqRel pairs with the thread's Release store when it ends: a thread
    // that saw it running relies on that thread's last look (below).
    if DRIVING.swap(true, Ordering::AcqRel) {
        return;
    }
    let spawned = std::thread::Builder::new().name("textpoke-live".into()).spawn(|| {
        crate::as_agent(drive_loop);
    });
    if spawned.is_err() {
        DRIVING.store(false, Ordering::Release);
        crate::note_once("cannot start the live-patch thread: transitions complete only when textpoke patch waits");
    }
}

/// The live-patch thread (module docs): drives until no transition is in
/// progress. Its mask is its creator's (the agent thread's or a session
/// thread's): every asynchronous signal blocked, so that none is
/// delivered here rather than to the program.
fn drive_loop() {
    crate::set_in_agent_thread();
    let p = Patcher::global();
    loop {
        match p.wait(DRIVE_SLICE) {
            Ok(c) => note(c),
            Err(LiveError::Pending(_)) => continue,
            Err(LiveError::NoTransition) => {}
            Err(e) => {
                crate::note_once(&format!("live patching: {e}"));
                std::thread::sleep(DRIVE_SLICE); // not a busy loop on a lasting error
            }
        }
        if p.transition().is_some() {
            continue;
        }
        // Release pairs with `drive`'s swap: a transition started after
        // this store starts a new thread; one started before it was seen
        // by the look below.
        DRIVING.store(false, Ordering::Release);
        if p.transition().is_none() || DRIVING.swap(true, Ordering::AcqRel) {
            stop_reclaimer();
            return;
        }
    }
}

/// When nothing records: frees what the completed transition retired and
/// stops the tracer's reclaimer thread, so that no thread of textpoke's
/// stays while no transition is pending (the next change starts it
/// again). A recording agent keeps it (its filter changes retire
/// trampolines).
fn stop_reclaimer() {
    let recording = crate::AGENT.lock().as_ref().is_some_and(|a| a.phase == crate::Phase::Recording);
    if recording || DRIVING.load(Ordering::Acquire) {
        return;
    }
    let tracer = textpoke::trace::Tracer::global();
    let _ = tracer.reclaim(DRIVE_SLICE);
    if let Err(e) = tracer.stop_reclaimer() {
        crate::note_once(&format!("the tracer's reclaimer thread keeps running: {e}"));
    }
}
