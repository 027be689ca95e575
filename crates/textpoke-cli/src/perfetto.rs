//! `dump --perfetto`: a trace as a Perfetto protobuf trace, which
//! ui.perfetto.dev and `trace_processor` open whatever its size (the
//! Chrome JSON format is parsed whole in the browser and fails beyond a
//! few hundred megabytes).
//!
//! # Layout
//!
//! A Perfetto trace is a `Trace` message: a repeated `TracePacket` field,
//! written here one packet at a time (tag, length, packet), so memory does
//! not grow with the trace. For each process a track descriptor (pid,
//! name), for each thread one (pid, tid, name) under it; then each thread's
//! calls on its own packet sequence: a `SLICE_BEGIN` track event at the
//! entry, a `SLICE_END` at the exit (with the return value as a debug
//! annotation when it was recorded), timestamps in `CLOCK_MONOTONIC`
//! nanoseconds. Function names are interned per sequence (the first use
//! of a name carries it in the packet's interned data; later events name
//! it by id), so a slice costs a few bytes whatever its name's length.
//!
//! Calls closed without their exit are ended where the analysis closed
//! them (see `textpoke::analysis`), with an annotation saying why; where
//! events were lost, an instant event says how many.

use perfetto_protos::debug_annotation::DebugAnnotation;
use perfetto_protos::interned_data::InternedData;
use perfetto_protos::process_descriptor::ProcessDescriptor;
use perfetto_protos::thread_descriptor::ThreadDescriptor;
use perfetto_protos::trace_packet::{trace_packet::SequenceFlags, TracePacket};
use perfetto_protos::track_descriptor::TrackDescriptor;
use perfetto_protos::track_event::{track_event::Type, EventName, TrackEvent};
use protobuf::{Message, MessageField};
use std::collections::HashMap;
use std::io::Write;
use textpoke::analysis::{self, AnalysisError, Closed, Event, Rebuilder, TraceSet};
use textpoke::record::FuncId;

/// Writes packets as fields of a `Trace` message.
struct Packets<'w> {
    w: &'w mut dyn Write,
    buf: Vec<u8>,
}

impl Packets<'_> {
    fn put(&mut self, p: &TracePacket) -> Result<(), AnalysisError> {
        self.buf.clear();
        self.buf.push(0x0a); // field 1 (packet), length-delimited
        p.write_length_delimited_to_vec(&mut self.buf).map_err(|e| AnalysisError::Write(std::io::Error::other(e)))?;
        self.w.write_all(&self.buf).map_err(AnalysisError::Write)
    }
}

fn process_uuid(pid: i32) -> u64 {
    1 << 32 | pid as u32 as u64
}

fn thread_uuid(pid: i32, tid: i32) -> u64 {
    2 << 56 | (pid as u32 as u64) << 24 ^ tid as u32 as u64
}

fn annotation(name: &str, value: i64) -> DebugAnnotation {
    let mut a = DebugAnnotation::new();
    a.set_name(name.to_string());
    a.set_int_value(value);
    a
}

/// One thread's packet sequence: its id and the names interned on it.
struct Sequence {
    id: u32,
    track: u64,
    interned: HashMap<FuncId, u64>,
    first: bool,
}

impl Sequence {
    /// A packet of this sequence at `ts` ns carrying `event`; interns
    /// `func`'s name first if this sequence has not seen it.
    fn packet(&mut self, ts: u64, mut event: TrackEvent, func: Option<(FuncId, &str)>) -> TracePacket {
        let mut p = TracePacket::new();
        p.set_timestamp(ts);
        p.set_trusted_packet_sequence_id(self.id);
        let mut flags = SequenceFlags::SEQ_NEEDS_INCREMENTAL_STATE as u32;
        if std::mem::take(&mut self.first) {
            flags |= SequenceFlags::SEQ_INCREMENTAL_STATE_CLEARED as u32;
        }
        p.set_sequence_flags(flags);
        if let Some((f, name)) = func {
            let next = self.interned.len() as u64 + 1;
            let iid = *self.interned.entry(f).or_insert_with(|| {
                let mut n = EventName::new();
                n.set_iid(next);
                n.set_name(name.to_string());
                let mut d = InternedData::new();
                d.event_names.push(n);
                p.interned_data = MessageField::some(d);
                next
            });
            event.set_name_iid(iid);
        }
        event.set_track_uuid(self.track);
        p.set_track_event(event);
        p
    }
}

fn descriptor(uuid: u64, parent: Option<u64>, f: impl FnOnce(&mut TrackDescriptor)) -> TracePacket {
    let mut d = TrackDescriptor::new();
    d.set_uuid(uuid);
    if let Some(p) = parent {
        d.set_parent_uuid(p);
    }
    f(&mut d);
    let mut p = TracePacket::new();
    p.set_track_descriptor(d);
    p
}

/// Writes the Perfetto protobuf trace of every process of `set` to `w`.
/// Returns the number of calls written.
pub fn perfetto(set: &TraceSet, w: &mut dyn Write, progress: &mut dyn FnMut(u64)) -> Result<u64, AnalysisError> {
    for p in &set.processes {
        if p.trace.mode() == textpoke::record::Mode::Count {
            let dir = p.trace.dir().to_path_buf();
            return Err(AnalysisError::CountOnly { dir, what: "timeline for a Perfetto trace" });
        }
    }
    let mut out = Packets { w, buf: Vec::with_capacity(256) };
    let mut calls = 0u64;
    let mut next_sequence = 1u32;
    for proc in &set.processes {
        let trace = &proc.trace;
        let pid = proc.pid();
        let label = analysis::escape(&proc.label()).into_owned();
        out.put(&descriptor(process_uuid(pid), None, |d| {
            let mut pd = ProcessDescriptor::new();
            pd.set_pid(pid);
            pd.set_process_name(label.clone());
            d.process = MessageField::some(pd);
        }))?;
        let mut rb = Rebuilder::new(trace.clock());
        for t in trace.threads() {
            let tid = t.tid();
            let track = thread_uuid(pid, tid);
            let name = if tid == pid { format!("{label} (main)") } else { format!("thread {tid}") };
            out.put(&descriptor(track, Some(process_uuid(pid)), |d| {
                let mut td = ThreadDescriptor::new();
                td.set_pid(pid);
                td.set_tid(tid);
                td.set_thread_name(name);
                d.thread = MessageField::some(td);
            }))?;
            let mut seq = Sequence { id: next_sequence, track, interned: HashMap::new(), first: true };
            next_sequence += 1;
            let mut err = None;
            analysis::walk_thread(trace, t, &mut rb, progress, &mut |e| {
                if err.is_some() {
                    return;
                }
                let packet = match e {
                    Event::Enter { func, ts, .. } => {
                        let mut ev = TrackEvent::new();
                        ev.set_type(Type::TYPE_SLICE_BEGIN);
                        let name = analysis::escape(trace.name(func));
                        seq.packet(trace.to_ns(ts), ev, Some((func, &name)))
                    }
                    Event::Leave(c) => {
                        calls += 1;
                        let mut ev = TrackEvent::new();
                        ev.set_type(Type::TYPE_SLICE_END);
                        if let Some(v) = c.value {
                            ev.debug_annotations.push(annotation("return", v as i64));
                        }
                        let why = match c.closed {
                            Closed::Returned => None,
                            Closed::Unfinished => Some("unfinished"),
                            Closed::ExitLost => Some("exit_lost"),
                            Closed::Gap => Some("cut_by_gap"),
                        };
                        if let Some(why) = why {
                            ev.debug_annotations.push(annotation(why, 1));
                        }
                        seq.packet(trace.to_ns(c.end), ev, None)
                    }
                    Event::Gap { lost, ts, .. } | Event::Cut { count: lost, ts } => {
                        let mut ev = TrackEvent::new();
                        ev.set_type(Type::TYPE_INSTANT);
                        let what = if matches!(e, Event::Gap { .. }) {
                            format!("{lost} events lost")
                        } else {
                            format!("{lost} events of a signal handler not recorded")
                        };
                        ev.set_name(what);
                        seq.packet(trace.to_ns(ts), ev, None)
                    }
                    Event::OrphanExit { .. } => return,
                };
                if let Err(x) = out.put(&packet) {
                    err = Some(x);
                }
            })?;
            if let Some(e) = err {
                return Err(e);
            }
        }
    }
    Ok(calls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use perfetto_protos::trace::Trace;

    #[test]
    fn packets_parse_back_as_a_trace() {
        let mut buf = Vec::new();
        let mut out = Packets { w: &mut buf, buf: Vec::new() };
        let mut seq = Sequence { id: 7, track: 99, interned: HashMap::new(), first: true };
        let mut begin = TrackEvent::new();
        begin.set_type(Type::TYPE_SLICE_BEGIN);
        out.put(&seq.packet(100, begin.clone(), Some((FuncId(3), "work")))).unwrap();
        let mut end = TrackEvent::new();
        end.set_type(Type::TYPE_SLICE_END);
        out.put(&seq.packet(150, end, None)).unwrap();
        out.put(&seq.packet(160, begin, Some((FuncId(3), "work")))).unwrap();
        let t = Trace::parse_from_bytes(&buf).unwrap();
        assert_eq!(t.packet.len(), 3);
        assert_eq!(t.packet[0].interned_data.event_names[0].name(), "work");
        assert!(t.packet[2].interned_data.is_none(), "a name is interned once per sequence");
        assert_eq!(t.packet[2].track_event().name_iid(), t.packet[0].track_event().name_iid());
        assert_eq!(t.packet[1].timestamp(), 150);
        assert_eq!(t.packet[0].sequence_flags() & SequenceFlags::SEQ_INCREMENTAL_STATE_CLEARED as u32, 1);
        assert_eq!(t.packet[1].sequence_flags() & SequenceFlags::SEQ_INCREMENTAL_STATE_CLEARED as u32, 0);
    }
}
