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
//! them (see `textpoke_analysis`), with an annotation saying why; where
//! events were lost, an instant event says how many.
//!
//! # Encoding
//!
//! The descriptors are built with `perfetto_protos`. The packets written
//! for every call and mark are encoded here by hand (`wire`): a handful
//! of varint and length-delimited fields into reused buffers, with no
//! message objects. Through `perfetto_protos` (compiled unoptimised, see
//! the workspace manifest) they took most of the exporter's time: 1.4 s
//! of CPU for a 10 MB trace, against a 2 s bound for any reader command
//! (issue #10; measured by textpoke-fuzz).

use perfetto_protos::process_descriptor::ProcessDescriptor;
use perfetto_protos::thread_descriptor::ThreadDescriptor;
use perfetto_protos::trace_packet::{trace_packet::SequenceFlags, TracePacket};
use perfetto_protos::track_descriptor::TrackDescriptor;
use perfetto_protos::track_event::track_event::Type;
use protobuf::{Message, MessageField};
use std::collections::HashMap;
use std::io::Write;
use textpoke_analysis::{self as analysis, AnalysisError, Closed, Event, Rebuilder, TraceSet};
use textpoke_record::FuncId;

/// The protobuf wire format, for the few fields written by hand (field
/// numbers from perfetto's `trace_packet.proto`, `track_event.proto`,
/// `debug_annotation.proto` and `interned_data.proto`).
mod wire {
    pub const TRACE_PACKET: u32 = 1; // Trace.packet
    pub const TIMESTAMP: u32 = 8; // TracePacket.timestamp
    pub const SEQUENCE_ID: u32 = 10; // TracePacket.trusted_packet_sequence_id
    pub const TRACK_EVENT: u32 = 11; // TracePacket.track_event
    pub const INTERNED_DATA: u32 = 12; // TracePacket.interned_data
    pub const SEQUENCE_FLAGS: u32 = 13; // TracePacket.sequence_flags
    pub const EVENT_NAMES: u32 = 2; // InternedData.event_names
    pub const IID: u32 = 1; // EventName.iid
    pub const NAME: u32 = 2; // EventName.name
    pub const DEBUG_ANNOTATIONS: u32 = 4; // TrackEvent.debug_annotations
    pub const TYPE: u32 = 9; // TrackEvent.type
    pub const NAME_IID: u32 = 10; // TrackEvent.name_iid
    pub const TRACK_UUID: u32 = 11; // TrackEvent.track_uuid
    pub const EVENT_NAME: u32 = 23; // TrackEvent.name
    pub const ANNOTATION_NAME: u32 = 10; // DebugAnnotation.name
    pub const INT_VALUE: u32 = 4; // DebugAnnotation.int_value

    pub fn varint(buf: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            buf.push(v as u8 | 0x80);
            v >>= 7;
        }
        buf.push(v as u8);
    }

    /// A varint field (uint32, uint64, int64 as two's complement, enum).
    pub fn uint(buf: &mut Vec<u8>, field: u32, v: u64) {
        varint(buf, (field as u64) << 3);
        varint(buf, v);
    }

    /// A length-delimited field (string, bytes, message).
    pub fn bytes(buf: &mut Vec<u8>, field: u32, data: &[u8]) {
        varint(buf, (field as u64) << 3 | 2);
        varint(buf, data.len() as u64);
        buf.extend_from_slice(data);
    }
}

/// Writes packets as fields of a `Trace` message.
struct Packets<'w> {
    w: &'w mut dyn Write,
    buf: Vec<u8>,
}

impl Packets<'_> {
    fn put(&mut self, p: &TracePacket) -> Result<(), AnalysisError> {
        self.buf.clear();
        let bytes = p.write_to_bytes().map_err(|e| AnalysisError::Write(std::io::Error::other(e)))?;
        wire::bytes(&mut self.buf, wire::TRACE_PACKET, &bytes);
        self.w.write_all(&self.buf).map_err(AnalysisError::Write)
    }

    /// Writes an encoded packet.
    fn put_encoded(&mut self, packet: &[u8]) -> Result<(), AnalysisError> {
        self.buf.clear();
        wire::bytes(&mut self.buf, wire::TRACE_PACKET, packet);
        self.w.write_all(&self.buf).map_err(AnalysisError::Write)
    }
}

fn process_uuid(pid: i32) -> u64 {
    1 << 32 | pid as u32 as u64
}

fn thread_uuid(pid: i32, tid: i32) -> u64 {
    2 << 56 | (pid as u32 as u64) << 24 ^ tid as u32 as u64
}

/// A track event to encode: its type, its name (a function's, interned;
/// or a literal one), its debug annotations.
struct TrackEvent<'a> {
    kind: Type,
    func: Option<FuncId>,
    name: Option<&'a str>,
    annotations: &'a [(&'a str, i64)],
}

/// One thread's packet sequence: its id and the names interned on it.
struct Sequence {
    id: u32,
    track: u64,
    interned: HashMap<FuncId, u64>,
    first: bool,
    /// Scratch buffers: the packet, its track event, a nested message.
    packet: Vec<u8>,
    event: Vec<u8>,
    nested: Vec<u8>,
}

impl Sequence {
    fn new(id: u32, track: u64) -> Sequence {
        Sequence {
            id,
            track,
            interned: HashMap::new(),
            first: true,
            packet: Vec::with_capacity(128),
            event: Vec::with_capacity(64),
            nested: Vec::with_capacity(64),
        }
    }

    /// The encoded packet of this sequence at `ts` ns carrying `e`;
    /// interns the function's name (`name_of`) first if this sequence has
    /// not seen it.
    fn packet(&mut self, ts: u64, e: &TrackEvent<'_>, name_of: &dyn Fn(FuncId) -> String) -> &[u8] {
        let (p, ev, nested) = (&mut self.packet, &mut self.event, &mut self.nested);
        p.clear();
        ev.clear();
        wire::uint(p, wire::TIMESTAMP, ts);
        wire::uint(p, wire::SEQUENCE_ID, self.id as u64);
        let mut flags = SequenceFlags::SEQ_NEEDS_INCREMENTAL_STATE as u64;
        if std::mem::take(&mut self.first) {
            flags |= SequenceFlags::SEQ_INCREMENTAL_STATE_CLEARED as u64;
        }
        wire::uint(p, wire::SEQUENCE_FLAGS, flags);
        wire::uint(ev, wire::TYPE, e.kind as u64);
        wire::uint(ev, wire::TRACK_UUID, self.track);
        if let Some(f) = e.func {
            let next = self.interned.len() as u64 + 1;
            let iid = *self.interned.entry(f).or_insert_with(|| {
                nested.clear();
                wire::uint(nested, wire::IID, next);
                wire::bytes(nested, wire::NAME, name_of(f).as_bytes());
                let mut d = Vec::with_capacity(nested.len() + 4);
                wire::bytes(&mut d, wire::EVENT_NAMES, nested);
                wire::bytes(p, wire::INTERNED_DATA, &d);
                next
            });
            wire::uint(ev, wire::NAME_IID, iid);
        }
        if let Some(name) = e.name {
            wire::bytes(ev, wire::EVENT_NAME, name.as_bytes());
        }
        for &(name, value) in e.annotations {
            nested.clear();
            wire::bytes(nested, wire::ANNOTATION_NAME, name.as_bytes());
            wire::uint(nested, wire::INT_VALUE, value as u64);
            wire::bytes(ev, wire::DEBUG_ANNOTATIONS, nested);
        }
        wire::bytes(p, wire::TRACK_EVENT, ev);
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
        if p.trace.mode() == textpoke_record::Mode::Count {
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
            let mut seq = Sequence::new(next_sequence, track);
            next_sequence += 1;
            let name_of = |f: FuncId| analysis::escape(trace.name(f)).into_owned();
            let mut err = None;
            analysis::walk_thread(trace, t, &mut rb, progress, &mut |e| {
                if err.is_some() {
                    return;
                }
                let none = TrackEvent { kind: Type::TYPE_UNSPECIFIED, func: None, name: None, annotations: &[] };
                let mut annotations = [("", 0i64); 2];
                let what;
                let (at, event) = match e {
                    Event::Enter { func, ts, .. } => {
                        (ts, TrackEvent { kind: Type::TYPE_SLICE_BEGIN, func: Some(func), ..none })
                    }
                    Event::Leave(c) => {
                        calls += 1;
                        let mut n = 0;
                        if let Some(v) = c.value {
                            annotations[n] = ("return", v as i64);
                            n += 1;
                        }
                        let why = match c.closed {
                            Closed::Returned => None,
                            Closed::Unfinished => Some("unfinished"),
                            Closed::ExitLost => Some("exit_lost"),
                            Closed::Gap => Some("cut_by_gap"),
                        };
                        if let Some(why) = why {
                            annotations[n] = (why, 1);
                            n += 1;
                        }
                        (c.end, TrackEvent { kind: Type::TYPE_SLICE_END, annotations: &annotations[..n], ..none })
                    }
                    Event::Gap { lost, ts: at, .. } | Event::Cut { count: lost, ts: at } => {
                        what = if matches!(e, Event::Gap { .. }) {
                            format!("{lost} events lost")
                        } else {
                            format!("{lost} events of a signal handler not recorded")
                        };
                        (at, TrackEvent { kind: Type::TYPE_INSTANT, name: Some(&what), ..none })
                    }
                    Event::OrphanExit { .. } => return,
                };
                let packet = seq.packet(trace.to_ns(at), &event, &name_of);
                if let Err(x) = out.put_encoded(packet) {
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
        let mut seq = Sequence::new(7, 99);
        let names = |f: FuncId| format!("work{}", f.0);
        let none = TrackEvent { kind: Type::TYPE_UNSPECIFIED, func: None, name: None, annotations: &[] };
        let begin = TrackEvent { kind: Type::TYPE_SLICE_BEGIN, func: Some(FuncId(3)), ..none };
        out.put_encoded(seq.packet(100, &begin, &names)).unwrap();
        let ann = [("return", -5i64), ("exit_lost", 1)];
        let end = TrackEvent { kind: Type::TYPE_SLICE_END, annotations: &ann, ..none };
        out.put_encoded(seq.packet(150, &end, &names)).unwrap();
        out.put_encoded(seq.packet(160, &begin, &names)).unwrap();
        let mark = TrackEvent { kind: Type::TYPE_INSTANT, name: Some("3 events lost"), ..none };
        out.put_encoded(seq.packet(u64::MAX, &mark, &names)).unwrap();
        out.put(&descriptor(5, Some(6), |_| {})).unwrap();
        let t = Trace::parse_from_bytes(&buf).unwrap();
        assert_eq!(t.packet.len(), 5);
        assert_eq!(t.packet[0].interned_data.event_names[0].name(), "work3");
        assert_eq!(t.packet[0].interned_data.event_names[0].iid(), 1);
        assert!(t.packet[2].interned_data.is_none(), "a name is interned once per sequence");
        assert_eq!(t.packet[0].track_event().name_iid(), 1);
        assert_eq!(t.packet[2].track_event().name_iid(), 1);
        assert_eq!(t.packet[0].track_event().type_(), Type::TYPE_SLICE_BEGIN);
        assert_eq!(t.packet[0].track_event().track_uuid(), 99);
        assert_eq!(t.packet[0].trusted_packet_sequence_id(), 7);
        assert_eq!(t.packet[1].timestamp(), 150);
        let a = &t.packet[1].track_event().debug_annotations;
        assert_eq!((a[0].name(), a[0].int_value()), ("return", -5));
        assert_eq!((a[1].name(), a[1].int_value()), ("exit_lost", 1));
        assert_eq!(t.packet[3].timestamp(), u64::MAX);
        assert_eq!(t.packet[3].track_event().type_(), Type::TYPE_INSTANT);
        assert_eq!(t.packet[3].track_event().name(), "3 events lost");
        assert_eq!(t.packet[4].track_descriptor().uuid(), 5);
        let flags = |i: usize| t.packet[i].sequence_flags();
        assert_eq!(
            flags(0),
            SequenceFlags::SEQ_INCREMENTAL_STATE_CLEARED as u32 | SequenceFlags::SEQ_NEEDS_INCREMENTAL_STATE as u32
        );
        assert_eq!(flags(1), SequenceFlags::SEQ_NEEDS_INCREMENTAL_STATE as u32);
    }
}
