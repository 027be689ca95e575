//! The tracer's API: [`Tracer`], the process's one tracer, through which
//! ops are registered, re-filtered and unregistered.

use super::hot::{self, InlineCode, OpBox, TraceOp, MAX_OPS, OPS};
use super::reclaim::Retired;
use super::state::{Inner, OpInfo};
use super::{Filter, FunctionInfo, OpHandle, PadMode, RefusedPad, TraceError};
use crate::arch::tramp;
use crate::sites::SiteTable;
use crate::sys::threads;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The process's tracer.
pub struct Tracer {
    pub(super) inner: Mutex<Inner>,
    /// Serialises reclaim steps (background and explicit).
    pub(super) reclaiming: Mutex<()>,
    /// Pid whose reclaimer thread runs (it does not survive fork): the
    /// fast path of `wake_reclaimer`.
    pub(super) reclaimer_pid: std::sync::atomic::AtomicI32,
    /// The reclaimer thread, to stop and join (`stop_reclaimer`).
    pub(super) reclaimer: Mutex<Option<super::reclaim::Reclaimer>>,
}

impl Tracer {
    /// The tracer of this process (sites are found on first use).
    pub fn global() -> &'static Tracer {
        static T: OnceLock<Tracer> = OnceLock::new();
        T.get_or_init(|| {
            // Without a key (none left), threads are registered without
            // an exit destructor and shadow stacks are not freed at exit.
            if let Ok(key) = threads::key_create(hot::thread_exit) {
                hot::REGISTRY_KEY.store(key as usize, Ordering::Relaxed);
            }
            if let Ok(key) = threads::key_create(hot::drop_shadow) {
                hot::SHADOW_KEY.store(key as usize, Ordering::Relaxed);
            }
            // The fork handler only touches the forking thread's state.
            // pthread_atfork fails only without memory for the entry.
            let _ = threads::at_fork_child(hot::after_fork_child);
            hot::PROCESS.store(threads::getpid(), Ordering::Relaxed);
            // Stubs raise the count in place when it is in static TLS; a
            // test switch (`testing` builds only) makes them call the
            // helpers, as with dynamic TLS.
            let dynamic =
                cfg!(feature = "testing") && std::env::var_os("TEXTPOKE_TEST_DYNAMIC_TLS").is_some_and(|v| v == "1");
            let counter = match hot::count_offset() {
                Some(off) if !dynamic => tramp::Counter::Tls(off),
                _ => tramp::Counter::Calls,
            };
            let mut inner = Inner {
                table: SiteTable::new(),
                sites: Vec::new(),
                by_addr: HashMap::new(),
                ops: (0..MAX_OPS).map(|_| None).collect(),
                ids_pending: 0,
                next_id: 0,
                blocks: Vec::new(),
                stub_blocks: Vec::new(),
                counter,
                routines: None,
                fresh_code: false,
                return_block: None,
                retired: Vec::new(),
                grace_enabled: true,
                prepare_pads: false,
                avx: tramp::has_avx(),
                graph_code: None,
                inline_recording: true,
                unwind: None,
                plt: Default::default(),
                mirrors: Default::default(),
            };
            inner.refresh();
            Tracer {
                inner: Mutex::new(inner),
                reclaiming: Mutex::new(()),
                reclaimer_pid: 0.into(),
                reclaimer: Mutex::new(None),
            }
        })
    }

    pub(super) fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, TraceError> {
        if hot::in_tracer() != 0 {
            return Err(TraceError::InCallback);
        }
        Ok(self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Rescans loaded objects: sites of new objects (dlopen) join and get
    /// the ops whose filters match; sites of unloaded ones are forgotten.
    pub fn refresh(&'static self) -> Result<(), TraceError> {
        let mut g = self.lock()?;
        g.refresh();
        let r = g.apply(Vec::new());
        self.after_change(g);
        r
    }

    /// Every traceable function found.
    pub fn functions(&self) -> Vec<FunctionInfo> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.sites.iter().enumerate().filter(|(_, s)| s.alive).map(|(i, _)| g.info(i)).collect()
    }

    /// The function of site `site`.
    pub fn function(&self, site: u32) -> Option<FunctionInfo> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (g.sites.get(site as usize)?.alive).then(|| g.info(site as usize))
    }

    /// The site patched at `addr`.
    pub fn site_at(&self, addr: usize) -> Option<u32> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).by_addr.get(&addr).copied()
    }

    /// Registers an op tracing the functions `filter` matches.
    pub fn register(&'static self, op: Arc<dyn TraceOp>, filter: Filter) -> Result<OpHandle, TraceError> {
        let mut g = self.lock()?;
        if g.free_id_peek().is_none() && g.ids_pending != 0 {
            // Every free id still waits for its grace period: wait for one
            // here rather than fail.
            drop(g);
            self.reclaim_step(Duration::from_secs(5))?;
            g = self.lock()?;
        }
        let id = g.free_id().ok_or(TraceError::TooManyOps)?;
        if op.wants_exit() {
            g.ensure_return_trampoline()?;
        }
        if let Some(InlineCode::Graph { entry, exit }) = op.inline() {
            g.ensure_graph_block(entry, exit)?;
        }
        let (wants_exit, wants_time) = (op.wants_exit(), op.wants_time());
        let boxed = Box::into_raw(Box::new(OpBox { wants_exit, op }));
        // Release: the box is complete before any site can call the op (apply
        // points sites at it only after this); pairs with the Acquire load in
        // `hot::for_each_op`.
        OPS[id].store(boxed, Ordering::Release);
        if wants_exit {
            // Release, though the hot path loads these bits Relaxed: it loads them
            // after a site's mask (Acquire, `hot::on_entry_list`) or a stub's word
            // (an x86 load), which apply stores after this with Release; those
            // pairs carry the bits too.
            hot::EXIT_OPS.fetch_or(1 << id, Ordering::Release);
        }
        if wants_time {
            // Release: partner as EXIT_OPS's just above.
            hot::TIME_OPS.fetch_or(1 << id, Ordering::Release);
        }
        g.ops[id] = Some(OpInfo { filter, boxed });
        // SAFETY: just boxed above, alive while registered.
        unsafe { &(*boxed).op }.functions_added(0..crate::funcs::count() as u32);
        g.update_fast_exit();
        if let Err(e) = g.apply(Vec::new()) {
            g.ops[id] = None;
            g.update_fast_exit();
            // The op never became reachable (apply put the masks back). Release
            // as when set: `hot::for_each_op`'s Acquire load (its partner) sees
            // the box or null, and skips null; the bits' partners as above.
            OPS[id].store(std::ptr::null_mut(), Ordering::Release);
            hot::EXIT_OPS.fetch_and(!(1 << id), Ordering::Release); // partner: as when set
            hot::TIME_OPS.fetch_and(!(1 << id), Ordering::Release); // partner: as when set
            g.ids_pending |= 1 << id;
            g.forget_op_trampolines(id);
            g.retire(vec![Retired::Op { id, boxed }]);
            self.after_change(g);
            return Err(e);
        }
        self.after_change(g);
        Ok(OpHandle(id))
    }

    /// Changes what an op traces; only sites whose op set changes are patched.
    pub fn set_filter(&'static self, h: &OpHandle, filter: Filter) -> Result<(), TraceError> {
        let mut g = self.lock()?;
        let info = g.ops[h.0].as_mut().ok_or(TraceError::UnknownOp(h.0))?;
        let old = std::mem::replace(&mut info.filter, filter);
        let r = g.apply(Vec::new());
        if r.is_err() {
            g.ops[h.0].as_mut().expect("still registered").filter = old;
        }
        self.after_change(g);
        r
    }

    /// Unregisters an op: its sites are unpatched (or keep other ops), and
    /// its trampolines and data are freed after a grace period.
    pub fn unregister(&'static self, h: OpHandle) -> Result<(), TraceError> {
        let mut g = self.lock()?;
        let info = g.ops[h.0].take().ok_or(TraceError::UnknownOp(h.0))?;
        // No new callbacks: `hot::for_each_op`'s Acquire load (pairs with this
        // Release) sees null and skips the op; a callback that loaded the box
        // before may use it until the grace period after apply's unpublish.
        // The bits' partners: as in `register`.
        OPS[h.0].store(std::ptr::null_mut(), Ordering::Release);
        hot::EXIT_OPS.fetch_and(!(1 << h.0), Ordering::Release); // partner: as when set
        hot::TIME_OPS.fetch_and(!(1 << h.0), Ordering::Release); // partner: as when set
        g.update_fast_exit();
        let retire = vec![Retired::Op { id: h.0, boxed: info.boxed }];
        g.ids_pending |= 1 << h.0;
        let r = g.apply(retire);
        // Its count and graph trampolines hold its code: the next op with
        // its id gets new ones (the old go with their blocks).
        g.forget_op_trampolines(h.0);
        self.after_change(g);
        r
    }

    /// Waits up to `patience` for a grace period and frees what was
    /// retired before the call. Returns how many items were freed.
    pub fn reclaim(&self, patience: Duration) -> Result<usize, TraceError> {
        if hot::in_tracer() != 0 {
            return Err(TraceError::InCallback);
        }
        self.reclaim_step(patience)
    }

    /// Items retired and not yet freed.
    pub fn retired(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).retired.len()
    }

    /// Whether a batch that parks every thread anyway (stop-machine: a gcc
    /// pad of five one-byte NOPs gets its branch) also turns every other
    /// pad into one 5-byte NOP, so that tracing those later takes the
    /// breakpoint protocol and sends no signal (a thread waiting in
    /// `nanosleep` or `poll` would get `EINTR`). Off by default: functions
    /// never traced keep their bytes. The agent turns it on (it starts
    /// before the program's threads, and owns the process's tracing).
    pub fn set_prepare_pads(&self, on: bool) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).prepare_pads = on;
    }

    /// How gcc's pads get their branch when first traced ([`PadMode`]):
    /// by stop-machine (the default), or by their first byte alone, which
    /// signals no thread. Takes effect at the next change.
    pub fn set_pad_mode(&self, mode: PadMode) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).mirrors.mode = mode;
    }

    /// The pad mode ([`Tracer::set_pad_mode`]).
    pub fn pad_mode(&self) -> PadMode {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).mirrors.mode
    }

    /// The pads an op's filter matches that are left untraced because
    /// their mirror cannot be placed ([`PadMode::OneByteOnly`]), with why;
    /// as of the last change.
    pub fn refused_pads(&self) -> Vec<RefusedPad> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).refused_pads()
    }

    /// Whether site `site` is still gcc's pad of five one-byte NOPs when
    /// not traced (it was never made one 5-byte NOP: it is enabled by its
    /// first byte, or was never traced); `None` for no such live site.
    pub fn is_gcc_pad(&self, site: u32) -> Option<bool> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.sites.get(site as usize).filter(|s| s.alive).map(|s| !s.prepared)
    }

    /// Test switch: free retired memory at once, without a grace period —
    /// shows what the grace period prevents.
    #[cfg(feature = "testing")]
    pub fn set_grace_period_for_tests(&self, enabled: bool) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).grace_enabled = enabled;
    }

    /// Test-only switch: run grace periods as on a kernel without
    /// `membarrier(PRIVATE_EXPEDITED)` (see [`grace`], "Without
    /// membarrier").
    #[cfg(feature = "testing")]
    pub fn set_grace_fallback_for_tests(&self, on: bool) {
        super::grace::force_fallback_for_tests(on);
    }

    /// How threads' quiescence counts are kept: `"tls"` (stubs raise them
    /// in place) or `"calls"` (dynamic TLS: stubs call helpers). For tests.
    #[cfg(feature = "testing")]
    pub fn counter_mode(&self) -> &'static str {
        match self.inner.lock().unwrap_or_else(|e| e.into_inner()).counter {
            tramp::Counter::Tls(_) => "tls",
            tramp::Counter::Calls => "calls",
        }
    }

    /// Test and benchmark switch: whether ops that count or record the
    /// function graph get the inline count and graph trampolines (default)
    /// or are called through the hot path like any op. Takes effect for
    /// ops registered afterwards.
    #[cfg(feature = "testing")]
    pub fn set_inline_recording(&self, enabled: bool) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.inline_recording = enabled;
        g.update_fast_exit();
    }

    /// Exits lost (frames skipped by longjmp or unwinding, or restored).
    pub fn lost_exits(&self) -> u64 {
        hot::LOST_EXITS.load(Ordering::Relaxed)
    }
}
