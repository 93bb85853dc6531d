//! The device: its state, lifecycle (reset, enable, disable), interrupts,
//! the status block and the `process()` step that runs everything. Each
//! concern the step drives lives in a child module as an `impl Device`
//! block over the state it owns:
//!
//! * `regs`: BAR0 reads and writes (the register file, staged setup);
//! * `control`: the control ring (TLB invalidation, CANCEL);
//! * `faults`: the fault unit (recording, the fault buffer, GET updates,
//!   REPLAY, cancellation of stalled work);
//! * `channels`: the virtqueues, the command in flight on each, completion.

mod channels;
mod control;
mod faults;
mod regs;
mod trace;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use faultline_abi::{
    doorbell, status_block, vector, ContextEntry, CtlEntry, DeviceError, FaultEntry, IntCause,
    StatusBlock, MAX_CTL_ENTRIES, NUM_CONTEXTS, PAGE_SIZE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::check::{CheckMode, CpuTables, Violation};
use crate::config::{Config, ConfigError};
use crate::counters::Counters;
use crate::engine::FaultRec;
use crate::inject::{Injector, Knob};
use crate::mmu::Mmu;
use crate::pci::{ConfigSpace, MsiState};
use crate::vram::Vram;
use channels::{Channel, Progress};
use control::{ControlRing, CtlProgress};
use faults::FaultUnit;
pub use faults::MAX_BACKLOG;
use regs::Setup;
use trace::Tracing;

/// Implemented by the host: deliver an MSI vector (irqfd, eventfd, ...).
pub trait InterruptSink: Send + Sync {
    /// Send `vector` (already folded into the enabled vector count and
    /// checked against the mask; look up the message with
    /// `MsiState::message`).
    fn trigger(&self, vector: u32);
    /// The guest reprogrammed the MSI capability.
    fn msi_changed(&self, _msi: &MsiState) {}
}

/// The first device error of one kind (`Device::take_first_errors`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirstError {
    pub code: DeviceError,
    /// `ERROR_INFO` of that error (the channel, for channel errors).
    pub info: u32,
}

impl std::fmt::Display for FirstError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GPU device error {:?} (info {}), caused by the guest; later ones of this kind \
             are counted (counter errors.{:?}), not logged",
            self.code, self.info, self.code
        )
    }
}

/// Pending doorbells, shareable with the thread that receives ioeventfd
/// wakes so ringing never needs the device lock.
#[derive(Debug, Default)]
pub struct Doorbells {
    pending: AtomicU64,
}

impl Doorbells {
    /// Ring doorbell `index` (`faultline_abi::doorbell`); unknown indices
    /// are ignored.
    pub fn ring(&self, index: u32) {
        if index < doorbell::COUNT {
            self.pending.fetch_or(1 << index, Ordering::AcqRel);
        }
    }
    fn take(&self) -> u64 {
        self.pending.swap(0, Ordering::AcqRel)
    }
    pub fn any(&self) -> bool {
        self.pending.load(Ordering::Acquire) != 0
    }
}

/// Channel slices one `process()` step runs at most (see there).
pub const STEP_SLICES: usize = 8;
/// Control-ring entries one `process()` step runs at most: an
/// INVALIDATE_RANGE costs a pass over the context's TLB.
pub const STEP_CONTROL_ENTRIES: u32 = 16;

/// BAR0 offsets of every doorbell, as (doorbell index, offset). Each wants
/// one 4-byte ioeventfd without datamatch.
pub fn doorbell_offsets() -> Vec<(u32, u64)> {
    (0..doorbell::COUNT)
        .map(|i| (i, doorbell::offset(i)))
        .collect()
}

/// The emulated GPU, generic over the guest memory it performs DMA on
/// (`GuestMemoryMmap` in-process, mmapped fd regions in a vfio-user server).
pub struct Device<M: GuestMemoryBackend> {
    mem: M,
    /// The device's own memory: kept across RESET (its contents are
    /// undefined to the guest then, like a real GPU's).
    vram: Vram,
    irq: Arc<dyn InterruptSink>,
    sizing: Config,
    config: ConfigSpace,
    doorbells: Arc<Doorbells>,
    waker: Option<Arc<dyn Fn() + Send + Sync>>,
    enabled: bool,
    error_code: u32,
    error_info: u32,
    int_status: IntCause,
    int_enable: IntCause,
    /// The setup registers as the guest last wrote them (writable only
    /// while disabled).
    staged: Setup,
    /// The setup ENABLE validated, which the device uses until disabled.
    active: Setup,
    mmu: Mmu,
    counters: Counters,
    faults: FaultUnit,
    control: ControlRing,
    channels: Vec<Channel>,
    clock: crate::clock::Clock,
    ts_hi_latch: u32,
    /// The first device error of each kind, waiting for the host to log it
    /// (at most one entry per `DeviceError` kind over the device's life).
    first_errors: Vec<FirstError>,
    /// The channel the next step starts with (round-robin).
    next_channel: usize,
    /// Steps run (`process()` calls on an enabled device), readable
    /// without the device lock (`step_counter`).
    steps: Arc<AtomicU64>,
    /// Faults the engines hit during this step, recorded at its end.
    queued_faults: Vec<FaultRec>,
    launch_step_limit: u64,
    /// Fault injection (`crate::inject`): `None` unless the host asked,
    /// and then every hook is one branch on it.
    inject: Option<Box<Injector>>,
    /// The fault timeline (`crate::trace`): `None` unless the host asked,
    /// and then every hook is one branch on it.
    trace: Option<Box<Tracing>>,
}

impl<M: GuestMemoryBackend> Device<M> {
    /// A device with the default sizing (`Config::default()`); without
    /// VRAM, with one warning saying why, if the host cannot map it
    /// (`with_config` makes that an error).
    pub fn new(mem: M, irq: Arc<dyn InterruptSink>) -> Self {
        let sizing = Config::default();
        let vram = Vram::new(sizing.vram).unwrap_or_else(|reason| {
            log::warn!(
                "GPU memory: cannot map {} bytes ({reason}); the device has no VRAM",
                sizing.vram
            );
            Vram::none()
        });
        Self::build(mem, irq, sizing, vram)
    }

    /// A device sized by `sizing` (fault buffer limit, TLB, channels).
    pub fn with_config(
        mem: M,
        irq: Arc<dyn InterruptSink>,
        sizing: Config,
    ) -> Result<Self, ConfigError> {
        sizing.validate()?;
        let vram = Vram::new(sizing.vram).map_err(|reason| ConfigError::VramMap {
            size: sizing.vram,
            reason,
        })?;
        Ok(Self::build(mem, irq, sizing, vram))
    }

    fn build(mem: M, irq: Arc<dyn InterruptSink>, mut sizing: Config, vram: Vram) -> Self {
        sizing.vram = vram.size();
        let mut mmu = Mmu::with_tlb_capacity(sizing.tlb_entries as usize);
        mmu.set_vram_size(vram.size());
        let mut d = Self {
            mem,
            vram,
            irq,
            sizing,
            config: ConfigSpace::new(),
            doorbells: Arc::new(Doorbells::default()),
            waker: None,
            enabled: false,
            error_code: 0,
            error_info: 0,
            int_status: IntCause::empty(),
            int_enable: IntCause::all(),
            staged: Setup::default(),
            active: Setup::default(),
            mmu,
            counters: Counters::default(),
            faults: FaultUnit::default(),
            control: ControlRing::default(),
            channels: (0..sizing.channels).map(|_| Channel::default()).collect(),
            clock: crate::clock::Clock::new(),
            ts_hi_latch: 0,
            first_errors: Vec::new(),
            next_channel: 0,
            steps: Arc::new(AtomicU64::new(0)),
            queued_faults: Vec::new(),
            launch_step_limit: faultline_abi::MAX_LAUNCH_STEPS,
            inject: sizing.inject.map(|spec| Box::new(Injector::new(spec))),
            trace: None,
        };
        d.set_checker(sizing.check, None);
        d
    }

    /// Turn the coherence checker on or off (docs/gpu-abi.md "Coherence
    /// checker"). `tables`: where CPU page tables are looked up; `None`
    /// walks x86-64 tables (`cpu_root`) in the device's own memory.
    /// Violations already counted stay counted; reporting starts afresh.
    pub fn set_checker(&mut self, mode: CheckMode, tables: Option<Arc<dyn CpuTables>>) {
        self.sizing.check = mode;
        self.counters.check.mode = mode;
        self.mmu.set_checker(mode, tables);
    }

    /// The device's memory (host tests and tools).
    pub fn vram(&self) -> &Vram {
        &self.vram
    }

    /// Coherence violations over the device's life (RESETs included).
    pub fn coherence_violations(&self) -> u64 {
        self.counters
            .lifetime(faultline_abi::Counter::CoherenceViolations)
    }

    /// Violation reports since the last call, one per (context, 4 KiB
    /// page), at most `check::REPORT_PAGES` in the checker's life. For the
    /// host to log with the device lock released, as `take_first_errors`
    /// (the worker does both after each step).
    pub fn take_coherence_reports(&mut self) -> Vec<Violation> {
        self.mmu.take_coherence_reports()
    }

    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Replace the memory the device performs DMA on (a vfio-user client
    /// maps and unmaps regions while the device lives). Translations cached
    /// in the TLBs are GPAs, not host pointers, so they stay valid; an
    /// access to a GPA no longer mapped fails like any access outside RAM.
    pub fn set_memory(&mut self, mem: M) -> M {
        std::mem::replace(&mut self.mem, mem)
    }

    pub fn config(&self) -> &Config {
        &self.sizing
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// What the host prints at exit (`--stats`): `counters().named()`,
    /// then with fault injection its spec (`inject.spec.<knob>`) and how
    /// often each knob fired (`inject.fired.<knob>`).
    pub fn named_counters(&self) -> Vec<(String, u64)> {
        let mut out = self.counters.named();
        out.push(("vram.size".into(), self.vram.size()));
        out.push(("vram.touched_bytes".into(), self.vram.touched_bytes()));
        if let Some(i) = &self.inject {
            out.extend(i.named());
        }
        out
    }

    /// The fault-injection state, if the host configured injection.
    pub fn injector(&self) -> Option<&Injector> {
        self.inject.as_deref()
    }

    /// Drive the device's clock by hand from now on (tests): deadlines
    /// then come due only when `clock` is advanced past them.
    #[cfg(feature = "test-utils")]
    pub fn set_manual_clock(&mut self, clock: &crate::ManualClock) {
        self.clock.set_manual(clock);
    }

    /// How long until deferred work (a late control ring, FAULT MSI or
    /// paused engine access) is due, for a host that would otherwise
    /// block: call `process()` again then. `None`: nothing deferred.
    /// Only fault injection defers work.
    pub fn next_deadline(&self) -> Option<Duration> {
        let inj = self.inject.as_deref()?;
        if !self.enabled {
            return None;
        }
        let held = self.channels.iter().filter_map(|c| c.held_until());
        let due = inj
            .msi_due
            .into_iter()
            .chain(inj.ctl_due.map(|(_, t)| t))
            .chain(held)
            .min()?;
        Some(Duration::from_nanos(due.saturating_sub(self.now())))
    }

    /// The first device error of each kind raised since the last call (each
    /// kind is reported once in the device's life; `counters()` counts them
    /// all). For the host to log once it released the device lock: the
    /// worker does so after each step.
    pub fn take_first_errors(&mut self) -> Vec<FirstError> {
        std::mem::take(&mut self.first_errors)
    }

    /// Steps the device has run (`process()` calls while enabled), shared
    /// so a thread can read it without the device lock (diagnostics, and
    /// tests of the worker's lock hand-over).
    pub fn step_counter(&self) -> Arc<AtomicU64> {
        self.steps.clone()
    }

    pub fn doorbells(&self) -> Arc<Doorbells> {
        self.doorbells.clone()
    }

    /// Called after every BAR0 write through [`Self::mmio_write`], so a
    /// worker can wake: a doorbell, but also ENABLE or CH_ENABLE, can make
    /// work runnable. Setup writes are rare and each one already cost its
    /// host an exit or a socket message, so a spare wake-up is free.
    pub fn set_waker(&mut self, waker: Arc<dyn Fn() + Send + Sync>) {
        self.waker = Some(waker);
    }

    pub fn msi_state(&self) -> MsiState {
        self.config.msi()
    }

    /// BAR0 base while the guest has memory decoding enabled.
    pub fn bar0_address(&self) -> Option<u64> {
        self.config.bar0()
    }

    pub fn config_read(&self, offset: u64, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    pub fn config_write(&mut self, offset: u64, data: &[u8]) {
        let effect = self.config.write(offset, data);
        if effect.msi_changed {
            self.irq.msi_changed(&self.config.msi());
            let ready = self.config.take_deliverable();
            for v in 0..32 {
                if ready & (1 << v) != 0 {
                    self.irq.trigger(v);
                }
            }
        }
    }

    /// What an ioeventfd wake calls: record the doorbell; `process()` acts.
    pub fn doorbell(&self, index: u32) {
        self.doorbells.ring(index);
    }

    fn now(&self) -> u64 {
        self.clock.now()
    }

    fn raise(&mut self, cause: IntCause) {
        self.int_status |= cause;
        if !self.int_enable.intersects(cause) {
            return;
        }
        let vec = if cause.contains(IntCause::FAULT) {
            vector::FAULT
        } else if cause.contains(IntCause::CHANNEL) {
            vector::CHANNEL
        } else if cause.contains(IntCause::ERROR) {
            vector::ERROR
        } else {
            vector::CONTROL
        };
        if let Some(v) = self.config.raise(vec) {
            self.irq.trigger(v);
            self.trace_event(crate::trace::Event::Msi { vector: vec });
        }
    }

    /// Fault entries were published (or the buffer overflowed): the FAULT
    /// interrupt, now or, with `fault_msi_delay_us`, once that has passed
    /// (one pending MSI covers every batch published meanwhile).
    fn raise_fault(&mut self) {
        if let Some(delay) = self
            .inject
            .as_deref()
            .map(|i| i.spec.fault_msi_delay_us)
            .filter(|d| *d != 0)
        {
            let due = self.now() + delay * 1000;
            let Some(inj) = self.inject.as_deref_mut() else {
                return;
            };
            if inj.msi_due.is_none() {
                inj.msi_due = Some(due);
                inj.fire(Knob::FaultMsiDelay);
            }
            return;
        }
        self.raise(IntCause::FAULT);
    }

    fn device_error(&mut self, code: DeviceError, info: u32) {
        // Every error is the guest's doing and a guest can raise them by
        // the million: count each, note only the first of each kind for the
        // host to log (never here, under the device lock; see
        // `take_first_errors`).
        if self.counters.device_error(code) == 1 {
            self.first_errors.push(FirstError { code, info });
        }
        self.error_code = code as u32;
        self.error_info = info;
        if self.enabled {
            // Best effort: the status block itself may be the problem.
            let _ = self.sb_store_raw(status_block::ERROR_CODE, code as u32);
        }
        self.raise(IntCause::ERROR);
    }

    // ---------------------------------------------------------- status block

    fn sb_store_raw(&self, field: u64, v: u32) -> Result<(), ()> {
        let addr = self.active.status_block + field;
        self.mem
            .store(v.to_le(), GuestAddress(addr), Ordering::Release)
            .map_err(|_| ())
    }

    /// Store status-block `field` (a `status_block` offset), release order.
    fn sb_store(&mut self, field: u64, v: u32) {
        if self.sb_store_raw(field, v).is_err() {
            self.device_error(DeviceError::MemoryError, field as u32);
        }
    }

    /// Load status-block `field` (a `status_block` offset), acquire order.
    fn sb_load(&mut self, field: u64) -> Option<u32> {
        let addr = self.active.status_block + field;
        match self.mem.load::<u32>(GuestAddress(addr), Ordering::Acquire) {
            Ok(v) => Some(u32::from_le(v)),
            Err(_) => {
                self.device_error(DeviceError::MemoryError, field as u32);
                None
            }
        }
    }

    // ------------------------------------------------------------- lifecycle

    /// Power-on state, except config space (MSI routing belongs to the
    /// host's view of the function) and the interrupt sink.
    pub fn reset(&mut self) {
        self.disable();
        if self.trace.is_some() {
            self.reset_trace_ring();
        }
        self.staged = Setup::default();
        self.active = Setup::default();
        self.error_code = 0;
        self.error_info = 0;
        self.int_status = IntCause::empty();
        self.int_enable = IntCause::all();
        self.counters.reset();
        self.doorbells.take();
        for c in &mut self.channels {
            *c = Channel::default();
        }
    }

    fn range_in_ram(&self, base: u64, len: u64) -> bool {
        base.checked_add(len).is_some()
            && usize::try_from(len).is_ok_and(|l| self.mem.check_range(GuestAddress(base), l))
    }

    fn enable(&mut self) {
        if self.enabled {
            return;
        }
        let r = self.staged;
        let bytes = |entries: u32, size: usize| u64::from(entries) * size as u64;
        let ok = r.status_block != 0
            && r.status_block.is_multiple_of(status_block::ALIGN)
            && self.range_in_ram(r.status_block, StatusBlock::SIZE as u64)
            && r.fault_buf.is_multiple_of(PAGE_SIZE)
            && r.fault_entries.is_power_of_two()
            && (2..=self.sizing.max_fault_entries).contains(&r.fault_entries)
            && self.range_in_ram(r.fault_buf, bytes(r.fault_entries, FaultEntry::SIZE))
            && r.ctx_table.is_multiple_of(PAGE_SIZE)
            && self.range_in_ram(r.ctx_table, bytes(NUM_CONTEXTS, ContextEntry::SIZE))
            && r.ctl_ring.is_multiple_of(PAGE_SIZE)
            && r.ctl_entries.is_power_of_two()
            && (2..=MAX_CTL_ENTRIES).contains(&r.ctl_entries)
            && self.range_in_ram(r.ctl_ring, bytes(r.ctl_entries, CtlEntry::SIZE));
        if !ok {
            self.device_error(DeviceError::BadSetup, 0);
            return;
        }
        self.active = r;
        self.enabled = true;
        self.mmu.set_context_table(r.ctx_table);
        self.faults = FaultUnit::default();
        self.control = ControlRing::default();
        if let Some(i) = &mut self.inject {
            i.drop_deferred();
        }
        for field in [
            status_block::FAULT_PUT,
            status_block::FAULT_FLAGS,
            status_block::CTL_CONS,
            status_block::ERROR_CODE,
            status_block::REPLAY_SEQ,
        ] {
            self.sb_store(field, 0);
        }
    }

    fn disable(&mut self) {
        self.enabled = false;
        for ch in 0..self.channels.len() {
            self.channel_stop(ch);
        }
        self.mmu.invalidate_all();
        self.faults = FaultUnit::default();
        if let Some(i) = &mut self.inject {
            i.drop_deferred();
        }
    }

    // --------------------------------------------------------------- process

    /// Run one bounded step of pending work: doorbells, then channel
    /// slices. Returns `true` if more work is ready (call again), `false`
    /// when idle or waiting for the driver. Deterministic: no threads
    /// involved.
    ///
    /// The step is what a host holds the device lock for, so it is bounded
    /// whatever the guest asks: at most `STEP_CONTROL_ENTRIES` control
    /// entries, one FAULT_GET update (at most `MAX_BACKLOG` entries), one
    /// REPLAY and `STEP_SLICES` channel slices (each at most
    /// `engine::XFER_SLICE` bytes of FILL/COPY or
    /// `isa::SLICE_STEPS + isa::WARP_QUANTUM - 1` warp-instructions),
    /// channels taken round-robin across steps.
    pub fn process(&mut self) -> bool {
        let mut bells = self.doorbells.take();
        if !self.enabled {
            return false;
        }
        let step = self.steps.fetch_add(1, Ordering::Relaxed) + 1;
        let mut busy = false;
        if self.trace.is_some() {
            self.drain_driver_trace(trace::STEP_TRACE_ENTRIES);
        }
        if self.inject.is_some() {
            bells = self.inject_gate(bells, step);
        }
        if bells & (1 << doorbell::CONTROL) != 0 {
            let progress = self.process_control(STEP_CONTROL_ENTRIES);
            let replay = bells & (1 << doorbell::REPLAY);
            // A REPLAY rung after the entries left waits for them:
            // retried accesses must not use translations an invalidation
            // still queued would remove.
            match (progress, self.inject.as_deref_mut()) {
                (CtlProgress::Done, _) => {}
                (CtlProgress::More, None) => {
                    // The rest next step.
                    self.doorbells.ring(doorbell::CONTROL);
                    if replay != 0 {
                        self.doorbells.ring(doorbell::REPLAY);
                    }
                    bells &= !replay;
                }
                (progress, Some(inj)) => {
                    // Retried next step without a new delay (it is no new
                    // doorbell); a blocked ring waits for a paused engine,
                    // whose deadline or completion wakes the next step.
                    inj.withheld |= (1 << doorbell::CONTROL) | replay;
                    inj.ctl_blocked = true;
                    busy = matches!(progress, CtlProgress::More);
                    bells &= !replay;
                }
                (CtlProgress::Blocked, None) => {}
            }
        }
        if bells & (1 << doorbell::FAULT_GET) != 0 {
            self.fault_get_update();
        }
        if bells & (1 << doorbell::REPLAY) != 0 {
            self.replay();
        }
        let n = self.channels.len();
        let first = self.next_channel;
        self.next_channel = (first + 1) % n;
        let mut slices = 0;
        'channels: for k in 0..n {
            let ch = (first + k) % n;
            // A few slices per turn, so small commands go quickly.
            for _ in 0..4 {
                if slices == STEP_SLICES {
                    // Out of budget: this channel resumes the next step.
                    self.next_channel = ch;
                    busy = true;
                    break 'channels;
                }
                match self.run_channel(ch) {
                    Progress::Busy => {
                        busy = true;
                        slices += 1;
                    }
                    Progress::Idle => break,
                }
            }
        }
        // One batch, so one FAULT interrupt per step however many channels
        // faulted.
        self.record_faults();
        busy || self.doorbells.any() || self.inject.as_deref().is_some_and(|i| i.busy(step))
    }

    /// Fault injection's doorbell gate, at the start of a step: send a FAULT
    /// MSI that is due, and hold CONTROL (and any REPLAY behind it) back
    /// until the control ring's delay has passed.
    fn inject_gate(&mut self, mut bells: u64, step: u64) -> u64 {
        let now = self.now();
        let Some(inj) = self.inject.as_deref_mut() else {
            return bells;
        };
        let msi = inj.msi_due.is_some_and(|t| t <= now);
        if msi {
            inj.msi_due = None;
        }
        const CONTROL: u64 = 1 << doorbell::CONTROL;
        const GATED: u64 = CONTROL | (1 << doorbell::REPLAY);
        let retry = std::mem::take(&mut inj.ctl_blocked);
        let (steps, us) = (inj.spec.tlb_ack_delay_steps, inj.spec.tlb_ack_delay_us);
        // Only a doorbell of the driver's starts a delay, and only when no
        // control work is deferred already (that one is served first).
        if (steps | us) != 0
            && bells & CONTROL != 0
            && inj.ctl_due.is_none()
            && !retry
            && inj.withheld & CONTROL == 0
        {
            inj.ctl_due = Some((step + steps, now + us * 1000));
            if steps != 0 {
                inj.fire(Knob::TlbAckDelaySteps);
            }
            if us != 0 {
                inj.fire(Knob::TlbAckDelayUs);
            }
        }
        match inj.ctl_due {
            Some((s, t)) if step < s || now < t => {
                inj.withheld |= bells & GATED;
                bells &= !GATED;
            }
            Some(_) => {
                inj.ctl_due = None;
                bells |= std::mem::take(&mut inj.withheld);
            }
            None if retry => bells |= std::mem::take(&mut inj.withheld),
            None => {}
        }
        if msi {
            self.raise(IntCause::FAULT);
        }
        bells
    }

    /// Process until idle (tests and simple hosts).
    pub fn run_until_idle(&mut self) {
        // Bounded so a kernel that loops forever still returns (it will fail
        // with Timeout after MAX_LAUNCH_STEPS anyway).
        for _ in 0..1_000_000 {
            if !self.process() {
                return;
            }
        }
    }

    /// Lower the LAUNCH step limit (tests; the ABI default is
    /// `MAX_LAUNCH_STEPS`, and values above it are clamped).
    pub fn set_launch_step_limit(&mut self, steps: u64) {
        self.launch_step_limit = steps.min(faultline_abi::MAX_LAUNCH_STEPS);
    }

    /// Direct access for hosts and tests that bypass the control ring.
    pub fn mmu_mut(&mut self) -> &mut Mmu {
        &mut self.mmu
    }
}
