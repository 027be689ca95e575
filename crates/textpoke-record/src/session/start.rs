//! Starting a session: checks the configuration, prepares the directory,
//! selects and calibrates the clock, writes a first metadata file,
//! publishes the session to the hot path and starts the writer thread.
//! A forked child's session is made here too (`new_session`, `publish`),
//! by the fork hook.

use super::drain::sweep;
use super::fork::install_fork_hooks;
use super::meta::write_meta;
use super::writer_thread::spawn_writer;
use super::{global_drops, Session, STATE};
use crate::buffer::{self, ACTIVE, MODE_COUNT, MODE_MASK, MODE_RECORD};
use crate::format::Mode;
use crate::writer::SymbolsOut;
use crate::{ClockChoice, RecordError, RecorderConfig};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use textpoke::clock::{self, Calibration, Clock};

pub(crate) fn start(config: RecorderConfig) -> Result<(), RecordError> {
    config.validate()?;
    crate::crash::reset(); // a flush that found the recorder busy is over
    buffer::ensure_key();
    install_fork_hooks();
    let mut st = STATE.lock();
    if let Some(s) = &st.session {
        return Err(RecordError::AlreadyActive { dir: s.dir.clone() });
    }
    crate::dir::prepare(&config.dir, config.replace_existing, config.keep_children)?;
    let source = match config.clock {
        ClockChoice::Auto => clock::detect().source,
        ClockChoice::Force(s) => s,
    };
    Clock::select(source);
    let calibration = Calibration::start(source, config.calibration);
    sweep(&mut st);
    st.epoch += 1;
    let mode_bits = if config.mode == Mode::Record { MODE_RECORD } else { MODE_COUNT };
    let id = st.epoch << 2 | mode_bits;
    let mut session = new_session(id, config.dir.clone(), None, config, calibration, true);
    write_meta(&mut session, &[], false);
    publish(id, &session.config);
    st.session = Some(session);
    let handle = spawn_writer(id).map_err(RecordError::Spawn);
    match handle {
        Ok(h) => {
            if let Some(s) = st.session.as_mut() {
                s.writer = Some(h);
            }
            Ok(())
        }
        Err(e) => {
            ACTIVE.store(0, Ordering::SeqCst);
            st.session = None;
            Err(e)
        }
    }
}

pub(super) fn new_session(
    id: u64,
    dir: PathBuf,
    parent_pid: Option<i32>,
    config: RecorderConfig,
    calibration: Calibration,
    dir_ready: bool,
) -> Session {
    Session {
        id,
        dir,
        dir_ready,
        parent_pid,
        calibration,
        start_unix_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
        start_ts: Clock::now(),
        threads: BTreeMap::new(),
        finished: Vec::new(),
        names: BTreeSet::new(),
        count_totals: Vec::new(),
        symbols: SymbolsOut::with_room(),
        drops_base: global_drops(),
        io_drops: 0,
        in_flight: 0,
        io_error: None,
        last_dropped: 0,
        orphan_calls: 0,
        last_meta: None,
        meta_due: true,
        words_out: 0,
        writer: None,
        stop_requested: false,
        config,
    }
}

/// Publishes a session to the hot path: configuration words first, then
/// ACTIVE with release (pairs with the acquire load in C3).
pub(super) fn publish(id: u64, config: &RecorderConfig) {
    let record = id & MODE_MASK == MODE_RECORD;
    buffer::CFG_SEGMENT.store(if record { config.segment_bytes as u64 } else { 0 }, Ordering::Relaxed);
    buffer::CFG_FUNCS.store(config.max_functions as u64, Ordering::Relaxed);
    buffer::CFG_THREAD_LIMIT.store(config.thread_limit as u64, Ordering::Relaxed);
    buffer::CFG_PREFAULT.store(config.prefault_buffers, Ordering::Relaxed);
    buffer::MEM_LIMIT.store(config.memory_limit as u64, Ordering::Relaxed);
    buffer::MEM_PEAK.store(buffer::MEM_USED.load(Ordering::Relaxed), Ordering::Relaxed);
    buffer::reset_orphans();
    ACTIVE.store(id, Ordering::Release);
}
