//! Device bring-up, the control ring, interrupts and the fault bottom half.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::mem::ManuallyDrop;
use core::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};

use faultline_abi::{
    doorbell, regs, status_block, vector, Access, ContextEntry, ContextFlags, CpuRoot, CtlEntry,
    CtlFlags, CtlOp, CtlStatus, DeviceError, DeviceStatus, FaultEntry, FaultFlags, Features,
    InjectKnobs, IntCause, StatusBlock, TraceKind, ABI_VERSION, DEVICE_MAGIC, MAX_CTL_ENTRIES,
    MAX_FAULT_ENTRIES, NUM_CHANNELS, NUM_CONTEXTS, PAGE_SIZE,
};

use super::counters::DriverCounters;
use super::policy::{FaultPolicy, Replay};
use super::stats::{Op, StatsSnapshot};
use super::trace::DriverTrace;
use super::{DmaRegion, GpuError, Platform};
use crate::sync::SpinMutex;

/// Driver settings fixed at probe time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuConfig {
    /// Fault-buffer entries (power of two, 2..=65536).
    pub fault_entries: u32,
    /// Control-ring entries (power of two, 2..=4096).
    pub ctl_entries: u32,
    /// Virtqueue size of each channel (power of two, 2..=256); a channel
    /// holds half as many commands in flight.
    pub queue_size: u16,
    /// How long a wait for the device may take before `GpuError::Timeout`.
    pub timeout_ns: u64,
    /// Longest single `Platform::wait_interrupt` sleep: several threads may
    /// wait at once and only one of them takes a given interrupt, so the
    /// others re-check memory at least this often.
    pub poll_slice_ns: u64,
    /// The fault pipeline's policies (batching, replay, prefetch).
    pub policy: FaultPolicy,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            fault_entries: 256,
            ctl_entries: 64,
            queue_size: 64,
            timeout_ns: 10_000_000_000,
            poll_slice_ns: 1_000_000,
            policy: FaultPolicy::default(),
        }
    }
}

/// One fault as the bottom half hands it to a context: deduplicated per
/// page with the strongest access seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Context index.
    pub context: u32,
    /// Page address (4 KiB aligned GPU VA).
    pub va: u64,
    /// Strongest access that faulted on the page in this batch.
    pub access: Access,
}

/// Who services the faults of a context (the SVM layer). Contexts without
/// one get every fault cancelled.
pub trait FaultHandler: Send + Sync {
    /// Service `faults` (one context, sorted by address, one per page).
    /// Push the address of every fault that cannot be satisfied to `cancel`;
    /// the bottom half cancels them, then replays as its policy says.
    fn service(&self, faults: &[Fault], cancel: &mut Vec<u64>);
}

struct CtlRing {
    ring: ManuallyDrop<DmaRegion>,
    prod: u32,
}

struct FaultState {
    get: u32,
    raw: Vec<Fault>,
    cancel: Vec<u64>,
    /// `Replay::Once`: batches were serviced since the last REPLAY, the
    /// first of them drained at `owed_since` (`Platform::stats_ticks`).
    owed: bool,
    owed_since: u64,
}

/// Per-context registration: who services its faults.
type Handler = Option<Arc<dyn FaultHandler>>;

/// The probed device. Shared (`Arc`) by contexts and channels.
pub struct Gpu<P: Platform> {
    platform: Arc<P>,
    cfg: GpuConfig,
    sb: ManuallyDrop<DmaRegion>,
    fault_buf: ManuallyDrop<DmaRegion>,
    ctx_table: ManuallyDrop<DmaRegion>,
    ctl: SpinMutex<CtlRing>,
    faults: SpinMutex<FaultState>,
    contexts: SpinMutex<[Handler; NUM_CONTEXTS as usize]>,
    ctx_used: AtomicU64,
    ch_used: AtomicU32,
    channels: u32,
    /// Bytes of device memory (0 without `Features::VRAM`).
    vram_size: u64,
    /// Last device error seen on the ERROR vector: code << 32 | info.
    last_error: AtomicU64,
    error_count: AtomicU32,
    counters: DriverCounters,
    /// `Platform::now_ns` when the driver last saw a TLB invalidation
    /// acknowledged (benchmarks time munmap → ack with it).
    tlb_ack_ns: AtomicU64,
    /// [`Gpu::fault_work_left`].
    work_left: AtomicBool,
    /// The driver's trace ring, while the host records a fault timeline.
    trace: Option<DriverTrace>,
}

fn pages(bytes: u64) -> usize {
    bytes.div_ceil(PAGE_SIZE) as usize
}

impl<P: Platform> Gpu<P> {
    /// Brings the device up: checks identity, resets it, allocates and
    /// programs the status block, fault buffer, context table and control
    /// ring, enables all interrupt causes and starts it.
    ///
    /// The platform must already have BAR0 mapped and MSI enabled with the
    /// vectors routed to whatever feeds `take_interrupts`.
    pub fn probe(platform: Arc<P>, cfg: GpuConfig) -> Result<Arc<Self>, GpuError> {
        let magic = platform.read32(regs::MAGIC);
        if magic != DEVICE_MAGIC {
            return Err(GpuError::NotFound(magic));
        }
        let version = platform.read32(regs::VERSION);
        if version >> 16 != ABI_VERSION >> 16 {
            return Err(GpuError::Version(version));
        }
        // ABI 1.1 sizing registers (0 / absent on 1.0 means the 1.0 limits).
        let channels = platform.read32(regs::NUM_CHANNELS).clamp(1, NUM_CHANNELS);
        let fault_max = match platform.read32(regs::FAULT_BUF_MAX) {
            0 => MAX_FAULT_ENTRIES,
            m => m.min(MAX_FAULT_ENTRIES),
        };
        let pow2 = |v: u32, max: u32| v.is_power_of_two() && (2..=max).contains(&v);
        if !pow2(cfg.fault_entries, fault_max)
            || !pow2(cfg.ctl_entries, MAX_CTL_ENTRIES)
            || !pow2(
                u32::from(cfg.queue_size),
                u32::from(faultline_abi::MAX_QUEUE_SIZE),
            )
        {
            return Err(GpuError::Invalid(
                "ring sizes must be powers of two in range",
            ));
        }
        let vram_size = match Features::from_bits_truncate(platform.read32(regs::FEATURES)) {
            f if f.contains(Features::VRAM) => {
                u64::from(platform.read32(regs::VRAM_SIZE_LO))
                    | u64::from(platform.read32(regs::VRAM_SIZE_HI)) << 32
            }
            _ => 0,
        };
        platform.write32(regs::RESET, regs::RESET_VALUE);

        let alloc = |bytes: u64| platform.dma_alloc(pages(bytes)).ok_or(GpuError::NoMemory);
        let bytes = |entries: u32, size: usize| u64::from(entries) * size as u64;
        let sb = alloc(StatusBlock::SIZE as u64)?;
        let fault_buf = alloc(bytes(cfg.fault_entries, FaultEntry::SIZE));
        let ctx_table = alloc(bytes(NUM_CONTEXTS, ContextEntry::SIZE));
        let ctl = alloc(bytes(cfg.ctl_entries, CtlEntry::SIZE));
        let (fault_buf, ctx_table, ctl) = match (fault_buf, ctx_table, ctl) {
            (Ok(f), Ok(c), Ok(r)) => (f, c, r),
            (f, c, r) => {
                for reg in [Some(sb), f.ok(), c.ok(), r.ok()].into_iter().flatten() {
                    platform.dma_free(reg);
                }
                return Err(GpuError::NoMemory);
            }
        };
        let w64 = |lo: u64, v: u64| {
            platform.write32(lo, v as u32);
            platform.write32(regs::upper_half(lo), (v >> 32) as u32);
        };
        w64(regs::STATUS_BLOCK_LO, sb.phys());
        w64(regs::FAULT_BUF_LO, fault_buf.phys());
        platform.write32(regs::FAULT_BUF_ENTRIES, cfg.fault_entries);
        w64(regs::CTX_TABLE_LO, ctx_table.phys());
        w64(regs::CTL_RING_LO, ctl.phys());
        platform.write32(regs::CTL_RING_ENTRIES, cfg.ctl_entries);
        platform.write32(regs::INT_ENABLE, IntCause::all().bits());
        platform.write32(regs::ENABLE, 1);
        let status = DeviceStatus::from_bits_truncate(platform.read32(regs::STATUS));
        let trace = DriverTrace::setup(&*platform);
        let gpu = Gpu {
            platform,
            cfg,
            sb: ManuallyDrop::new(sb),
            fault_buf: ManuallyDrop::new(fault_buf),
            ctx_table: ManuallyDrop::new(ctx_table),
            ctl: SpinMutex::new(CtlRing {
                ring: ManuallyDrop::new(ctl),
                prod: 0,
            }),
            faults: SpinMutex::new(FaultState {
                get: 0,
                raw: Vec::new(),
                cancel: Vec::new(),
                owed: false,
                owed_since: 0,
            }),
            contexts: SpinMutex::new([const { None }; NUM_CONTEXTS as usize]),
            ctx_used: AtomicU64::new(0),
            ch_used: AtomicU32::new(0),
            channels,
            vram_size,
            last_error: AtomicU64::new(0),
            error_count: AtomicU32::new(0),
            counters: DriverCounters::default(),
            tlb_ack_ns: AtomicU64::new(0),
            work_left: AtomicBool::new(false),
            trace,
        };
        if !status.contains(DeviceStatus::ENABLED) {
            // Drop resets the device and frees the memory.
            return Err(GpuError::Device {
                code: gpu.platform.read32(regs::ERROR_CODE),
                info: gpu.platform.read32(regs::ERROR_INFO),
            });
        }
        Ok(Arc::new(gpu))
    }

    /// The machine interface.
    pub fn platform(&self) -> &Arc<P> {
        &self.platform
    }

    /// The probe-time settings.
    pub fn config(&self) -> &GpuConfig {
        &self.cfg
    }

    /// Channels the device implements.
    pub fn channels(&self) -> u32 {
        self.channels
    }

    /// Bytes of device memory (VRAM_SIZE), 0 when the device has none or
    /// predates it (no `Features::VRAM`).
    pub fn vram_size(&self) -> u64 {
        self.vram_size
    }

    /// The host's fault-injection knobs in effect (INJECT_ACTIVE), so a
    /// test can state what it expects; empty on a device without them.
    pub fn inject_active(&self) -> InjectKnobs {
        InjectKnobs::from_bits_truncate(self.platform.read32(regs::INJECT_ACTIVE))
    }

    /// Driver counters.
    pub fn counters(&self) -> &DriverCounters {
        &self.counters
    }

    /// The counters and the per-size latencies (`gpu::stats`).
    pub fn stats(&self) -> StatsSnapshot {
        StatsSnapshot {
            counters: self.counters.snapshot(),
            latency: (self.counters.latency).snapshot(|t| self.platform.stats_ticks_to_ns(t)),
        }
    }

    /// `Platform::now_ns` at the moment the driver last saw a TLB
    /// invalidation acknowledged (0: never).
    pub fn last_tlb_ack_ns(&self) -> u64 {
        self.platform
            .stats_ticks_to_ns(self.tlb_ack_ns.load(Ordering::Acquire))
    }

    /// A device counter (`faultline_abi::Counter` index), read over MMIO
    /// (slow: two register reads; diagnostics only).
    pub fn device_counter(&self, index: u32) -> u64 {
        let lo = self.platform.read32(regs::counter(index));
        let hi = self.platform.read32(regs::upper_half(regs::counter(index)));
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// The last device error reported on the ERROR vector, as
    /// `(code, info)`, and how many were reported.
    pub fn last_error(&self) -> Option<(u32, u32, u32)> {
        let n = self.error_count.load(Ordering::Acquire);
        let e = self.last_error.load(Ordering::Acquire);
        (n > 0).then_some(((e >> 32) as u32, e as u32, n))
    }

    pub(crate) fn deadline(&self) -> u64 {
        self.platform.now_ns().saturating_add(self.cfg.timeout_ns)
    }

    /// Sleeps for at most one poll slice, or returns `Timeout(what)` once
    /// `deadline` passed.
    pub(crate) fn wait_slice(&self, deadline: u64, what: &'static str) -> Result<(), GpuError> {
        let now = self.platform.now_ns();
        if now >= deadline {
            return Err(GpuError::Timeout(what));
        }
        self.platform
            .wait_interrupt((deadline - now).min(self.cfg.poll_slice_ns));
        Ok(())
    }

    fn sb_load(&self, off: u64) -> u32 {
        let v = self.sb.read_u32(off as usize);
        // Pairs with the device's release store of the index.
        fence(Ordering::Acquire);
        v
    }

    fn sb_store(&self, off: u64, v: u32) {
        // Everything written before (entries, PTEs) is visible first.
        fence(Ordering::Release);
        self.sb.write_u32(off as usize, v);
    }

    // ------------------------------------------------------------ interrupts

    /// The bottom half: takes the pending vectors, records device errors and
    /// services faults (unless `service_faults` is false: callers that hold
    /// the mmap lock or run inside an invalidation must not fault pages in).
    /// Returns the vectors it took. Safe to call from any thread at any
    /// time; fault servicing runs in one caller at a time.
    pub fn poll(&self, service_faults: bool) -> u32 {
        let irq = self.platform.take_interrupts();
        if irq & (1 << vector::ERROR) != 0 {
            let code = self.platform.read32(regs::ERROR_CODE);
            let info = self.platform.read32(regs::ERROR_INFO);
            if code != 0 {
                log::warn!("gpu: device error {code} info {info:#x}");
                self.last_error
                    .store(u64::from(code) << 32 | u64::from(info), Ordering::Release);
                self.error_count.fetch_add(1, Ordering::AcqRel);
                self.platform.write32(regs::ERROR_CLEAR, 1);
            }
        }
        if service_faults {
            self.service_faults();
        }
        irq
    }

    /// Services the fault buffer under the GPU's [`FaultPolicy`]: up to
    /// `batches` batches of up to `batch` entries each; per batch the
    /// faults are sorted, deduplicated, dispatched to their contexts, what
    /// cannot be satisfied is cancelled, and REPLAY is rung as the replay
    /// policy says. Returns whether it found any entry (or rang a replay
    /// it owed). If another thread is already servicing, returns false at
    /// once.
    pub fn service_faults(&self) -> bool {
        let Some(mut st) = self.faults.try_lock() else {
            return false;
        };
        let st = &mut *st;
        let pol = self.cfg.policy;
        let batch = pol.batch_for(self.cfg.fault_entries);
        let mut found = false;
        for _ in 0..pol.batches.max(1) {
            if !self.drain(st, batch) {
                break;
            }
            found = true;
            let drained = self.platform.stats_ticks();
            let FaultState { raw, cancel, .. } = st;
            DriverCounters::add(&self.counters.faults_serviced, raw.len() as u64);
            if pol.replay == Replay::Block {
                // Each fault's replay timed from its own dispatch.
                for k in 0..raw.len() {
                    let t = if k == 0 {
                        drained
                    } else {
                        self.platform.stats_ticks()
                    };
                    self.dispatch(&raw[k..k + 1], cancel);
                    self.replay(t);
                }
                continue;
            }
            self.dispatch(raw, cancel);
            match pol.replay {
                Replay::Block | Replay::Batch => self.replay(drained),
                Replay::BatchFlush => {
                    self.flush(st);
                    self.replay(drained);
                }
                Replay::Once if !st.owed => (st.owed, st.owed_since) = (true, drained),
                Replay::Once => {}
            }
        }
        let left = self.sb_load(status_block::FAULT_PUT) != st.get
            || FaultFlags::from_bits_truncate(self.sb_load(status_block::FAULT_FLAGS))
                .contains(FaultFlags::OVERFLOW);
        if st.owed && !left {
            st.owed = false;
            self.replay(st.owed_since);
            found = true;
        }
        self.work_left.store(left, Ordering::Release);
        found
    }

    /// Reads up to `batch` entries (GET onwards) into `st.raw`, advances
    /// GET, then sorts them by (context, page, strongest access first) and
    /// keeps one per page. False if the buffer held nothing.
    fn drain(&self, st: &mut FaultState, batch: u32) -> bool {
        let put = self.sb_load(status_block::FAULT_PUT);
        let overflow = FaultFlags::from_bits_truncate(self.sb_load(status_block::FAULT_FLAGS))
            .contains(FaultFlags::OVERFLOW);
        if put == st.get && !overflow {
            return false;
        }
        // Never trust PUT beyond one buffer's worth.
        let n = put
            .wrapping_sub(st.get)
            .min(self.cfg.fault_entries)
            .min(batch);
        st.raw.clear();
        for i in 0..n {
            let slot = (st.get.wrapping_add(i) % self.cfg.fault_entries) as usize;
            let e = FaultEntry::from_le_bytes(&self.fault_buf.read_array(slot * FaultEntry::SIZE));
            st.raw.push(Fault {
                context: e.context,
                va: e.va & !(PAGE_SIZE - 1),
                // Anything outside the ABI is served as the strongest access.
                access: Access::from_u8(e.access).unwrap_or(Access::Atomic),
            });
        }
        st.get = st.get.wrapping_add(n);
        self.sb_store(status_block::FAULT_GET, st.get);
        if overflow {
            // The device writes the entries it held back once told.
            self.platform
                .write32(doorbell::offset(doorbell::FAULT_GET), 1);
        }
        DriverCounters::add(&self.counters.faults_read, u64::from(n));
        DriverCounters::add(&self.counters.batches, 1);

        st.raw
            .sort_unstable_by(|a, b| (a.context, a.va, b.access).cmp(&(b.context, b.va, a.access)));
        let before = st.raw.len();
        st.raw
            .dedup_by(|later, first| later.context == first.context && later.va == first.va);
        DriverCounters::add(
            &self.counters.faults_deduplicated,
            (before - st.raw.len()) as u64,
        );
        self.trace(
            TraceKind::BatchDrained,
            0,
            u64::from(n),
            st.raw.len() as u64,
        );
        true
    }

    /// Hands `faults` (sorted by context) to their contexts' handlers and
    /// cancels what they could not satisfy; returns once the device
    /// acknowledged the cancels, so a replay after it retries only the rest.
    fn dispatch(&self, faults: &[Fault], cancel: &mut Vec<u64>) {
        cancel.clear();
        let mut cancels: Vec<(u32, u64)> = Vec::new();
        let mut i = 0;
        while i < faults.len() {
            let ctx = faults[i].context;
            let j = i + faults[i..].iter().take_while(|f| f.context == ctx).count();
            let handler = self
                .contexts
                .lock()
                .get(ctx as usize)
                .and_then(|h| h.clone());
            match handler {
                Some(h) => h.service(&faults[i..j], cancel),
                None => cancel.extend(faults[i..j].iter().map(|f| f.va)),
            }
            cancels.extend(cancel.drain(..).map(|va| (ctx, va)));
            i = j;
        }
        if cancels.is_empty() {
            return;
        }
        DriverCounters::add(&self.counters.cancels, cancels.len() as u64);
        let mut last = None;
        for (ctx, va) in cancels {
            self.trace(TraceKind::Cancel, ctx, va, 0);
            match self.ctl_submit(CtlOp::CancelRange, ctx, va, 0) {
                Ok(seq) => last = Some(seq),
                Err(e) => log::warn!("gpu: cancel of {va:#x} not submitted: {e}"),
            }
        }
        if let Some(seq) = last {
            // Cancels must land before the replay retries the rest.
            if let Err(e) = self.ctl_wait(seq) {
                log::warn!("gpu: cancel not acknowledged: {e}");
            }
        }
    }

    /// FLUSH_FAULTS, then GET = PUT: drops the entries the next replay
    /// makes redundant (docs/gpu-abi.md "FLUSH_FAULTS"). On a device
    /// without the op nothing is dropped.
    fn flush(&self, st: &mut FaultState) {
        if let Err(e) = self.control(CtlOp::FlushFaults, 0, 0, 0) {
            log::debug!("gpu: fault-buffer flush: {e}");
            return;
        }
        let put = self.sb_load(status_block::FAULT_PUT);
        let n = put.wrapping_sub(st.get).min(self.cfg.fault_entries);
        st.get = st.get.wrapping_add(n);
        self.sb_store(status_block::FAULT_GET, st.get);
        DriverCounters::add(&self.counters.faults_flushed, u64::from(n));
    }

    /// Adds an event to the host's fault timeline, if it records one.
    pub(crate) fn trace(&self, kind: TraceKind, context: u32, a: u64, b: u64) {
        if let Some(t) = &self.trace {
            t.push(self.platform.trace_tsc().unwrap_or(0), kind, context, a, b);
        }
    }

    /// Rings REPLAY for what was drained at `since` (`Platform::stats_ticks`).
    fn replay(&self, since: u64) {
        self.trace(TraceKind::Replay, 0, 0, 0);
        self.platform.write32(doorbell::offset(doorbell::REPLAY), 1);
        DriverCounters::add(&self.counters.replays, 1);
        self.counters
            .latency
            .record_replay(since, self.platform.stats_ticks());
    }

    /// Whether the last service call left entries in the fault buffer (its
    /// batch limit ran out): a waiter that services faults should call
    /// again at once rather than sleep for an interrupt that was taken.
    pub fn fault_work_left(&self) -> bool {
        self.work_left.load(Ordering::Acquire)
    }

    /// A waiter's sleep between two `poll(true)` calls: none while fault
    /// entries are left over, else [`Gpu::wait_slice`].
    pub(crate) fn wait_servicing(&self, deadline: u64, what: &'static str) -> Result<(), GpuError> {
        if self.fault_work_left() {
            return if self.platform.now_ns() >= deadline {
                Err(GpuError::Timeout(what))
            } else {
                Ok(())
            };
        }
        self.wait_slice(deadline, what)
    }

    // ---------------------------------------------------------- control ring

    /// Queues a control entry and rings DB_CONTROL; returns its sequence
    /// number for [`Gpu::ctl_wait`]. Waits (without servicing faults) while
    /// the ring is full.
    pub fn ctl_submit(
        &self,
        op: CtlOp,
        context: u32,
        start: u64,
        len: u64,
    ) -> Result<u32, GpuError> {
        let deadline = self.deadline();
        loop {
            {
                let mut c = self.ctl.lock();
                let cons = self.sb_load(status_block::CTL_CONS);
                if c.prod.wrapping_sub(cons) < self.cfg.ctl_entries {
                    let seq = c.prod;
                    let entry = CtlEntry {
                        op: op.into(),
                        status: CtlStatus::Pending.into(),
                        context,
                        flags: CtlFlags::NOTIFY.bits(),
                        start,
                        len,
                    };
                    c.ring
                        .write_array(self.ctl_offset(seq), &entry.to_le_bytes());
                    c.prod = seq.wrapping_add(1);
                    self.sb_store(status_block::CTL_PROD, c.prod);
                    self.platform
                        .write32(doorbell::offset(doorbell::CONTROL), 1);
                    return Ok(seq);
                }
            }
            self.poll(false);
            self.wait_slice(deadline, "control ring space")?;
        }
    }

    /// Waits until the device acknowledged control entry `seq` (its
    /// `ctl_cons` passed it) and returns its status. Never services faults,
    /// so it is safe inside invalidation callbacks.
    pub fn ctl_wait(&self, seq: u32) -> Result<(), GpuError> {
        let deadline = self.deadline();
        loop {
            let cons = self.sb_load(status_block::CTL_CONS);
            if cons.wrapping_sub(seq.wrapping_add(1)) as i32 >= 0 {
                let status_at = self.ctl_offset(seq) + CtlEntry::STATUS_OFFSET;
                let status = self.ctl.lock().ring.read_u32(status_at);
                return if status == CtlStatus::Ok as u32 {
                    Ok(())
                } else {
                    Err(GpuError::Control(status))
                };
            }
            self.poll(false);
            if let Some((code, info, _)) = self.last_error() {
                if code == DeviceError::BadControlRing as u32
                    || code == DeviceError::MemoryError as u32
                {
                    return Err(GpuError::Device { code, info });
                }
            }
            self.wait_slice(deadline, "control ring acknowledgement")?;
        }
    }

    /// Byte offset of control entry `seq` in the ring.
    fn ctl_offset(&self, seq: u32) -> usize {
        (seq % self.cfg.ctl_entries) as usize * CtlEntry::SIZE
    }

    /// Submits one control entry and waits for its acknowledgement.
    pub fn control(&self, op: CtlOp, context: u32, start: u64, len: u64) -> Result<(), GpuError> {
        let seq = self.ctl_submit(op, context, start, len)?;
        self.ctl_wait(seq)
    }

    /// Drops the device TLB entries of `context` overlapping
    /// `[start, start + len)` and waits for the acknowledgement: when this
    /// returns, no device access can use a translation of that range that
    /// was cached before the call.
    pub fn invalidate_range(&self, context: u32, start: u64, len: u64) -> Result<(), GpuError> {
        if len == 0 {
            return Ok(());
        }
        let submitted = self.platform.stats_ticks();
        let seq = self.ctl_submit(CtlOp::InvalidateRange, context, start, len)?;
        // Mutant (a): returning here lets the caller change the CPU PTEs and
        // free the frames while the device may still hit the old entries.
        #[cfg(feature = "mutants")]
        if super::mutant::active(super::mutant::Mutant::NoAckWait) {
            return Ok(());
        }
        self.ctl_wait(seq)?;
        self.note_tlb_ack(submitted, len);
        Ok(())
    }

    /// Drops every TLB entry of `context` (needed after changing its
    /// context-table entry) and waits for the acknowledgement.
    pub fn invalidate_context(&self, context: u32) -> Result<(), GpuError> {
        let submitted = self.platform.stats_ticks();
        self.control(CtlOp::InvalidateContext, context, 0, 0)?;
        // The whole address space: counted with the largest ranges.
        self.note_tlb_ack(submitted, u64::MAX);
        Ok(())
    }

    /// An invalidation of `len` bytes submitted at `submitted`
    /// (`Platform::stats_ticks`) was acked.
    fn note_tlb_ack(&self, submitted: u64, len: u64) {
        // One clock read: `last_tlb_ack_ns` converts when asked.
        let acked = self.platform.stats_ticks();
        self.tlb_ack_ns.store(acked, Ordering::Release);
        DriverCounters::add(&self.counters.tlb_invalidates, 1);
        self.counters
            .latency
            .record(Op::TlbInvalidate, len, submitted, acked);
    }

    // ------------------------------------------------------ context slots

    pub(crate) fn alloc_context(&self, root: u64, cpu_root: CpuRoot) -> Result<u32, GpuError> {
        let mut used = self.ctx_used.load(Ordering::Acquire);
        let idx = loop {
            let free = !used;
            if free == 0 {
                return Err(GpuError::NoSlot);
            }
            let i = free.trailing_zeros();
            match self.ctx_used.compare_exchange(
                used,
                used | 1 << i,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break i,
                Err(u) => used = u,
            }
        };
        // The device loads root, cpu_root and flags as separate words
        // (`ContextEntry`): both roots are visible before VALID.
        let entry = idx as usize * ContextEntry::SIZE;
        self.ctx_table
            .write_u64(entry + ContextEntry::ROOT_OFFSET, root);
        self.ctx_table
            .write_u32(entry + ContextEntry::CPU_ROOT_OFFSET, cpu_root.0);
        fence(Ordering::Release);
        self.ctx_table.write_u32(
            entry + ContextEntry::FLAGS_OFFSET,
            ContextFlags::VALID.bits(),
        );
        // The device may have cached a walk of a previous user of the slot.
        if let Err(e) = self.invalidate_context(idx) {
            self.free_context(idx);
            return Err(e);
        }
        Ok(idx)
    }

    /// Marks the slot invalid, fails its stalled work, drops its TLB.
    pub(crate) fn free_context(&self, idx: u32) {
        self.contexts.lock()[idx as usize] = None;
        let entry = idx as usize * ContextEntry::SIZE;
        self.ctx_table
            .write_u32(entry + ContextEntry::FLAGS_OFFSET, 0);
        self.ctx_table
            .write_u64(entry + ContextEntry::ROOT_OFFSET, 0);
        self.ctx_table
            .write_u32(entry + ContextEntry::CPU_ROOT_OFFSET, 0);
        for op in [CtlOp::CancelContext, CtlOp::InvalidateContext] {
            if let Err(e) = self.control(op, idx, 0, 0) {
                log::warn!("gpu: teardown of context {idx}: {e}");
            }
        }
        self.ctx_used.fetch_and(!(1 << idx), Ordering::AcqRel);
    }

    /// Installs (or removes) the fault handler of context `idx`.
    pub(crate) fn set_handler(&self, idx: u32, h: Handler) {
        self.contexts.lock()[idx as usize] = h;
    }

    pub(crate) fn alloc_channel(&self) -> Result<u32, GpuError> {
        let mut used = self.ch_used.load(Ordering::Acquire);
        loop {
            let free = !used & ((1 << self.channels) - 1);
            if free == 0 {
                return Err(GpuError::NoSlot);
            }
            let i = free.trailing_zeros();
            match self.ch_used.compare_exchange(
                used,
                used | 1 << i,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(i),
                Err(u) => used = u,
            }
        }
    }

    pub(crate) fn free_channel(&self, idx: u32) {
        self.ch_used.fetch_and(!(1 << idx), Ordering::AcqRel);
    }
}

impl<P: Platform> Drop for Gpu<P> {
    fn drop(&mut self) {
        // Stop all DMA before the memory goes back to the platform.
        self.platform.write32(regs::RESET, regs::RESET_VALUE);
        // SAFETY: the fields are never touched again (we are in drop), and
        // the reset above ended the device's use of them.
        let regions = unsafe {
            [
                ManuallyDrop::take(&mut self.ctl.get_mut().ring),
                ManuallyDrop::take(&mut self.sb),
                ManuallyDrop::take(&mut self.fault_buf),
                ManuallyDrop::take(&mut self.ctx_table),
            ]
        };
        for r in regions {
            self.platform.dma_free(r);
        }
        if let Some(t) = self.trace.take() {
            self.platform.dma_free(t.into_region());
        }
    }
}
