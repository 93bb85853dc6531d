//! The device: register file, doorbells, status block, fault buffer,
//! control ring, channels, and the `process()` step that runs everything.

use std::collections::{HashSet, VecDeque};
use std::mem::offset_of;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use faultline_abi::{
    ctl_entry, ctl_op, doorbell, regs, status_block, vector, Access, ChannelFlags, ChannelStatus,
    Counter, CtlEntry, CtlFlags, CtlStatus, DeviceError, DeviceStatus, FaultEntry, FaultFlags,
    IntCause, Status, ABI_VERSION, COMMAND_SIZE, DEVICE_MAGIC, MAX_CTL_ENTRIES, MAX_QUEUE_SIZE,
    NUM_CONTEXTS, NUM_COUNTERS, PAGE_SIZE, VA_LIMIT,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::config::{Config, ConfigError};
use crate::counters::Counters;
use crate::engine::{Env, FaultRec, Job, Outcome};
use crate::mmu::Mmu;
use crate::pci::{ConfigSpace, MsiState};

/// Implemented by the host: deliver an MSI vector (irqfd, eventfd, ...).
pub trait InterruptSink: Send + Sync {
    /// Send `vector` (already folded into the enabled vector count and
    /// checked against the mask; look up the message with
    /// `MsiState::message`).
    fn trigger(&self, vector: u32);
    /// The guest reprogrammed the MSI capability.
    fn msi_changed(&self, _msi: &MsiState) {}
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

/// BAR0 offsets of every doorbell, as (doorbell index, offset). Each wants
/// one 4-byte ioeventfd without datamatch.
pub fn doorbell_offsets() -> Vec<(u32, u64)> {
    (0..doorbell::COUNT)
        .map(|i| (i, doorbell::offset(i)))
        .collect()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Setup {
    status_block: u64,
    fault_buf: u64,
    fault_entries: u32,
    ctx_table: u64,
    ctl_ring: u64,
    ctl_entries: u32,
}

struct Active {
    head: u16,
    completion: u64,
    opcode: u32,
    job: Job,
    stalled: bool,
}

#[derive(Default)]
struct Channel {
    size: u32,
    desc: u64,
    avail: u64,
    used: u64,
    context: u32,
    flags: u32,
    queue: Option<Queue>,
    error: bool,
    /// Guest notifications are suppressed while we know there is work.
    notify_off: bool,
    active: Option<Active>,
}

#[derive(Default)]
struct FaultUnit {
    put: u32,
    pending: HashSet<(u32, u64, Access)>,
    unreported: VecDeque<FaultEntry>,
    overflow: bool,
}

enum Progress {
    Idle,
    Busy,
}

fn set_lo(v: &mut u64, lo: u32) {
    *v = (*v & !0xFFFF_FFFF) | u64::from(lo);
}
fn set_hi(v: &mut u64, hi: u32) {
    *v = (*v & 0xFFFF_FFFF) | (u64::from(hi) << 32);
}

fn entry_bytes(e: &FaultEntry) -> [u8; 32] {
    let mut b = [0u8; 32];
    let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
    put(offset_of!(FaultEntry, va), &e.va.to_le_bytes());
    put(
        offset_of!(FaultEntry, timestamp),
        &e.timestamp.to_le_bytes(),
    );
    put(offset_of!(FaultEntry, context), &e.context.to_le_bytes());
    put(offset_of!(FaultEntry, access), &[e.access]);
    put(offset_of!(FaultEntry, reason), &[e.reason]);
    put(offset_of!(FaultEntry, engine), &[e.engine]);
    put(offset_of!(FaultEntry, channel), &[e.channel]);
    put(offset_of!(FaultEntry, info), &e.info.to_le_bytes());
    b
}

/// The emulated GPU, generic over the guest memory it performs DMA on
/// (`GuestMemoryMmap` in-process, mmapped fd regions in a vfio-user server).
pub struct Device<M: GuestMemoryBackend> {
    mem: M,
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
    regs: Setup,
    live: Setup,
    mmu: Mmu,
    counters: Counters,
    faults: FaultUnit,
    ctl_cons: u32,
    ctl_broken: bool,
    replay_seq: u32,
    channels: Vec<Channel>,
    epoch: Instant,
    ts_hi_latch: u32,
    scratch: Vec<FaultRec>,
    launch_step_limit: u64,
}

impl<M: GuestMemoryBackend> Device<M> {
    /// A device with the default sizing (`Config::default()`).
    pub fn new(mem: M, irq: Arc<dyn InterruptSink>) -> Self {
        Self::build(mem, irq, Config::default())
    }

    /// A device sized by `sizing` (fault buffer limit, TLB, channels).
    pub fn with_config(
        mem: M,
        irq: Arc<dyn InterruptSink>,
        sizing: Config,
    ) -> Result<Self, ConfigError> {
        sizing.validate()?;
        Ok(Self::build(mem, irq, sizing))
    }

    fn build(mem: M, irq: Arc<dyn InterruptSink>, sizing: Config) -> Self {
        Self {
            mem,
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
            regs: Setup::default(),
            live: Setup::default(),
            mmu: Mmu::with_tlb_capacity(sizing.tlb_entries as usize),
            counters: Counters::default(),
            faults: FaultUnit::default(),
            ctl_cons: 0,
            ctl_broken: false,
            replay_seq: 0,
            channels: (0..sizing.channels).map(|_| Channel::default()).collect(),
            epoch: Instant::now(),
            ts_hi_latch: 0,
            scratch: Vec::new(),
            launch_step_limit: faultline_abi::MAX_LAUNCH_STEPS,
        }
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
        self.epoch.elapsed().as_nanos() as u64
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
        }
    }

    fn device_error(&mut self, code: DeviceError, info: u32) {
        log::warn!("faultline device error {code:?} info {info}");
        self.error_code = code as u32;
        self.error_info = info;
        if self.enabled {
            // Best effort: the status block itself may be the problem.
            let _ = self.sb_store_raw(status_block::ERROR_CODE, code as u32);
        }
        self.raise(IntCause::ERROR);
    }

    fn sb_store_raw(&self, off: u64, v: u32) -> Result<(), ()> {
        let addr = self.live.status_block + off;
        self.mem
            .store(v.to_le(), GuestAddress(addr), Ordering::Release)
            .map_err(|_| ())
    }

    fn sb_store(&mut self, off: u64, v: u32) {
        if self.sb_store_raw(off, v).is_err() {
            self.device_error(DeviceError::MemoryError, off as u32);
        }
    }

    fn sb_load(&mut self, off: u64) -> Option<u32> {
        let addr = self.live.status_block + off;
        match self.mem.load::<u32>(GuestAddress(addr), Ordering::Acquire) {
            Ok(v) => Some(u32::from_le(v)),
            Err(_) => {
                self.device_error(DeviceError::MemoryError, off as u32);
                None
            }
        }
    }

    // ---------------------------------------------------------------- MMIO

    /// Read BAR0. Aligned 4-byte accesses (8 in the counter window);
    /// anything else reads zeros.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let cwin = regs::COUNTERS_BASE..regs::counter(NUM_COUNTERS);
        if data.len() == 8 && offset.is_multiple_of(8) && cwin.contains(&offset) {
            let v = self
                .counters
                .slot(((offset - regs::COUNTERS_BASE) / 8) as u32);
            data.copy_from_slice(&v.to_le_bytes());
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let r = &self.regs;
        match offset {
            regs::MAGIC => DEVICE_MAGIC,
            regs::VERSION => ABI_VERSION,
            regs::NUM_CONTEXTS => NUM_CONTEXTS,
            regs::NUM_CHANNELS => self.sizing.channels,
            regs::FAULT_BUF_MAX => self.sizing.max_fault_entries,
            regs::TLB_ENTRIES => self.sizing.tlb_entries,
            regs::STATUS => {
                let mut s = DeviceStatus::empty();
                s.set(DeviceStatus::ENABLED, self.enabled);
                s.set(DeviceStatus::ERROR, self.error_code != 0);
                s.bits()
            }
            regs::ENABLE => u32::from(self.enabled),
            regs::ERROR_CODE => self.error_code,
            regs::ERROR_INFO => self.error_info,
            regs::INT_STATUS => self.int_status.bits(),
            regs::INT_ENABLE => self.int_enable.bits(),
            regs::STATUS_BLOCK_LO => r.status_block as u32,
            regs::STATUS_BLOCK_HI => (r.status_block >> 32) as u32,
            regs::FAULT_BUF_LO => r.fault_buf as u32,
            regs::FAULT_BUF_HI => (r.fault_buf >> 32) as u32,
            regs::FAULT_BUF_ENTRIES => r.fault_entries,
            regs::CTX_TABLE_LO => r.ctx_table as u32,
            regs::CTX_TABLE_HI => (r.ctx_table >> 32) as u32,
            regs::CTL_RING_LO => r.ctl_ring as u32,
            regs::CTL_RING_HI => (r.ctl_ring >> 32) as u32,
            regs::CTL_RING_ENTRIES => r.ctl_entries,
            regs::TIMESTAMP_LO => {
                let t = self.now();
                self.ts_hi_latch = (t >> 32) as u32;
                t as u32
            }
            regs::TIMESTAMP_HI => self.ts_hi_latch,
            o if (regs::CHANNEL_BASE..regs::channel_reg(self.sizing.channels, 0)).contains(&o) => {
                let ch = ((o - regs::CHANNEL_BASE) / regs::CHANNEL_STRIDE) as usize;
                let c = &self.channels[ch];
                match (o - regs::CHANNEL_BASE) % regs::CHANNEL_STRIDE {
                    regs::CH_QUEUE_SIZE => c.size,
                    regs::CH_DESC_LO => c.desc as u32,
                    regs::CH_DESC_HI => (c.desc >> 32) as u32,
                    regs::CH_AVAIL_LO => c.avail as u32,
                    regs::CH_AVAIL_HI => (c.avail >> 32) as u32,
                    regs::CH_USED_LO => c.used as u32,
                    regs::CH_USED_HI => (c.used >> 32) as u32,
                    regs::CH_CONTEXT => c.context,
                    regs::CH_FLAGS => c.flags,
                    regs::CH_ENABLE => {
                        let mut s = ChannelStatus::empty();
                        s.set(ChannelStatus::RUNNING, c.queue.is_some());
                        s.set(ChannelStatus::ERROR, c.error);
                        s.bits()
                    }
                    _ => 0,
                }
            }
            o if (regs::COUNTERS_BASE..regs::counter(NUM_COUNTERS)).contains(&o) => {
                let v = self.counters.slot(((o - regs::COUNTERS_BASE) / 8) as u32);
                if o % 8 == 0 {
                    v as u32
                } else {
                    (v >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    /// Write BAR0 (aligned 4-byte accesses; others are ignored), then wake
    /// the worker (see [`Self::set_waker`]).
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        self.apply_mmio_write(offset, data);
        if let Some(w) = &self.waker {
            w();
        }
    }

    fn apply_mmio_write(&mut self, offset: u64, data: &[u8]) {
        if (regs::DOORBELL_BASE..doorbell::offset(doorbell::COUNT)).contains(&offset)
            && offset.is_multiple_of(regs::DOORBELL_STRIDE)
        {
            // Any size: the value is ignored, as with an ioeventfd.
            self.doorbell(((offset - regs::DOORBELL_BASE) / regs::DOORBELL_STRIDE) as u32);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let v = u32::from_le_bytes(bytes);
        let setup_ok = !self.enabled;
        let r = &mut self.regs;
        match offset {
            regs::RESET if v == regs::RESET_VALUE => self.reset(),
            regs::ENABLE => {
                if v & 1 != 0 {
                    self.enable();
                } else {
                    self.disable();
                }
            }
            regs::ERROR_CLEAR => {
                self.error_code = 0;
                self.error_info = 0;
            }
            regs::INT_STATUS => {
                self.int_status &= !IntCause::from_bits_truncate(v);
            }
            regs::INT_ENABLE => self.int_enable = IntCause::from_bits_truncate(v),
            regs::STATUS_BLOCK_LO if setup_ok => set_lo(&mut r.status_block, v),
            regs::STATUS_BLOCK_HI if setup_ok => set_hi(&mut r.status_block, v),
            regs::FAULT_BUF_LO if setup_ok => set_lo(&mut r.fault_buf, v),
            regs::FAULT_BUF_HI if setup_ok => set_hi(&mut r.fault_buf, v),
            regs::FAULT_BUF_ENTRIES if setup_ok => r.fault_entries = v,
            regs::CTX_TABLE_LO if setup_ok => set_lo(&mut r.ctx_table, v),
            regs::CTX_TABLE_HI if setup_ok => set_hi(&mut r.ctx_table, v),
            regs::CTL_RING_LO if setup_ok => set_lo(&mut r.ctl_ring, v),
            regs::CTL_RING_HI if setup_ok => set_hi(&mut r.ctl_ring, v),
            regs::CTL_RING_ENTRIES if setup_ok => r.ctl_entries = v,
            o if (regs::CHANNEL_BASE..regs::channel_reg(self.sizing.channels, 0)).contains(&o) => {
                let ch = ((o - regs::CHANNEL_BASE) / regs::CHANNEL_STRIDE) as usize;
                let reg = (o - regs::CHANNEL_BASE) % regs::CHANNEL_STRIDE;
                if reg == regs::CH_ENABLE {
                    if v & 1 != 0 {
                        self.channel_enable(ch);
                    } else {
                        self.channel_stop(ch);
                    }
                    return;
                }
                let c = &mut self.channels[ch];
                if c.queue.is_some() {
                    return;
                }
                match reg {
                    regs::CH_QUEUE_SIZE => c.size = v,
                    regs::CH_DESC_LO => set_lo(&mut c.desc, v),
                    regs::CH_DESC_HI => set_hi(&mut c.desc, v),
                    regs::CH_AVAIL_LO => set_lo(&mut c.avail, v),
                    regs::CH_AVAIL_HI => set_hi(&mut c.avail, v),
                    regs::CH_USED_LO => set_lo(&mut c.used, v),
                    regs::CH_USED_HI => set_hi(&mut c.used, v),
                    regs::CH_CONTEXT => c.context = v,
                    regs::CH_FLAGS => c.flags = v,
                    _ => {}
                }
            }
            _ => {}
        }
    }

    /// Power-on state, except config space (MSI routing belongs to the
    /// host's view of the function) and the interrupt sink.
    pub fn reset(&mut self) {
        self.disable();
        self.regs = Setup::default();
        self.live = Setup::default();
        self.error_code = 0;
        self.error_info = 0;
        self.int_status = IntCause::empty();
        self.int_enable = IntCause::all();
        self.counters = Counters::default();
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
        let r = self.regs;
        let ok = r.status_block != 0
            && r.status_block.is_multiple_of(status_block::ALIGN)
            && self.range_in_ram(r.status_block, status_block::SIZE)
            && r.fault_buf.is_multiple_of(PAGE_SIZE)
            && r.fault_entries.is_power_of_two()
            && (2..=self.sizing.max_fault_entries).contains(&r.fault_entries)
            && self.range_in_ram(r.fault_buf, u64::from(r.fault_entries) * 32)
            && r.ctx_table.is_multiple_of(PAGE_SIZE)
            && self.range_in_ram(r.ctx_table, u64::from(NUM_CONTEXTS) * 16)
            && r.ctl_ring.is_multiple_of(PAGE_SIZE)
            && r.ctl_entries.is_power_of_two()
            && (2..=MAX_CTL_ENTRIES).contains(&r.ctl_entries)
            && self.range_in_ram(r.ctl_ring, u64::from(r.ctl_entries) * 32);
        if !ok {
            self.device_error(DeviceError::BadSetup, 0);
            return;
        }
        self.live = r;
        self.enabled = true;
        self.mmu.set_context_table(r.ctx_table);
        self.faults = FaultUnit::default();
        self.ctl_cons = 0;
        self.ctl_broken = false;
        self.replay_seq = 0;
        for off in [
            status_block::FAULT_PUT,
            status_block::FAULT_FLAGS,
            status_block::CTL_CONS,
            status_block::ERROR_CODE,
            status_block::REPLAY_SEQ,
        ] {
            self.sb_store(off, 0);
        }
    }

    fn disable(&mut self) {
        self.enabled = false;
        for ch in 0..self.channels.len() {
            self.channel_stop(ch);
        }
        self.mmu.invalidate_all();
        self.faults = FaultUnit::default();
    }

    fn channel_enable(&mut self, ch: usize) {
        let c = &self.channels[ch];
        if c.queue.is_some() {
            return;
        }
        let n = u64::from(c.size);
        let ok = self.enabled
            && c.size.is_power_of_two()
            && c.size <= u32::from(MAX_QUEUE_SIZE)
            && c.desc.is_multiple_of(16)
            && c.avail.is_multiple_of(2)
            && c.used.is_multiple_of(4)
            && c.context < NUM_CONTEXTS
            && self.range_in_ram(c.desc, 16 * n)
            && self.range_in_ram(c.avail, 6 + 2 * n)
            && self.range_in_ram(c.used, 6 + 8 * n);
        let queue = ok.then(|| self.make_queue(ch)).flatten();
        let c = &mut self.channels[ch];
        c.error = queue.is_none();
        c.notify_off = false;
        c.active = None;
        c.queue = queue;
        if c.error {
            self.device_error(DeviceError::BadChannelSetup, ch as u32);
        }
    }

    fn make_queue(&self, ch: usize) -> Option<Queue> {
        let c = &self.channels[ch];
        let mut q = Queue::new(MAX_QUEUE_SIZE).ok()?;
        q.try_set_size(c.size as u16).ok()?;
        q.try_set_desc_table_address(GuestAddress(c.desc)).ok()?;
        q.try_set_avail_ring_address(GuestAddress(c.avail)).ok()?;
        q.try_set_used_ring_address(GuestAddress(c.used)).ok()?;
        q.set_event_idx(
            ChannelFlags::from_bits_truncate(c.flags).contains(ChannelFlags::EVENT_IDX),
        );
        q.set_ready(true);
        q.is_valid(&self.mem).then_some(q)
    }

    fn channel_stop(&mut self, ch: usize) {
        let c = &mut self.channels[ch];
        c.queue = None;
        c.active = None;
    }

    // ------------------------------------------------------------- process

    /// Run pending work: doorbells, then a bounded slice of every channel.
    /// Returns `true` if more work is ready (call again), `false` when idle
    /// or waiting for the driver. Deterministic: no threads involved.
    pub fn process(&mut self) -> bool {
        let bells = self.doorbells.take();
        if !self.enabled {
            return false;
        }
        if bells & (1 << doorbell::CONTROL) != 0 {
            self.process_control();
        }
        if bells & (1 << doorbell::FAULT_GET) != 0 {
            self.fault_get_update();
        }
        if bells & (1 << doorbell::REPLAY) != 0 {
            self.replay();
        }
        let mut busy = false;
        for ch in 0..self.channels.len() {
            // A few slices per channel per call keeps channels fair and
            // bounds how long a host holds the device lock.
            for _ in 0..4 {
                match self.run_channel(ch) {
                    Progress::Busy => busy = true,
                    Progress::Idle => break,
                }
            }
        }
        // One batch, so one FAULT interrupt per step however many channels
        // faulted.
        self.record_faults();
        busy || self.doorbells.any()
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

    fn run_channel(&mut self, ch: usize) -> Progress {
        let Self {
            mem,
            mmu,
            counters,
            scratch,
            channels,
            launch_step_limit,
            ..
        } = self;
        let c = &mut channels[ch];
        let Some(q) = c.queue.as_mut() else {
            return Progress::Idle;
        };
        if let Some(a) = c.active.as_mut() {
            if a.stalled {
                return Progress::Idle;
            }
            let mut env = Env {
                mem: &*mem,
                mmu,
                counters,
                faults: scratch,
                ctx: c.context,
                channel: ch as u8,
                launch_step_limit: *launch_step_limit,
            };
            match a.job.run(&mut env) {
                Outcome::Done(status, result) => {
                    let Some(a) = c.active.take() else {
                        return Progress::Idle;
                    };
                    self.complete(ch, a.head, a.completion, a.opcode, status, result);
                }
                Outcome::Stalled => a.stalled = true,
                Outcome::Yield => {}
            }
            return Progress::Busy;
        }
        // Next command.
        let chain = match q.iter(&*mem) {
            Ok(mut it) => it.next(),
            Err(_) => {
                c.queue = None;
                c.error = true;
                self.device_error(DeviceError::BadQueue, ch as u32);
                return Progress::Idle;
            }
        };
        let Some(chain) = chain else {
            // Empty: ask for a doorbell again, then re-check to close the
            // race with a driver that added work meanwhile.
            if !c.notify_off {
                return Progress::Idle;
            }
            c.notify_off = false;
            return match q.enable_notification(&*mem) {
                Ok(true) => Progress::Busy,
                Ok(false) => Progress::Idle,
                Err(_) => {
                    c.queue = None;
                    c.error = true;
                    self.device_error(DeviceError::BadQueue, ch as u32);
                    Progress::Idle
                }
            };
        };
        if !c.notify_off {
            c.notify_off = true;
            let _ = q.disable_notification(&*mem);
        }
        let head = chain.head_index();
        let mut cmd: Option<[u8; COMMAND_SIZE]> = None;
        let mut cmd_bad = false;
        let mut completion = None;
        for d in chain {
            if !d.is_write_only() {
                if cmd.is_none() && !cmd_bad && d.len() as usize >= COMMAND_SIZE {
                    let mut b = [0u8; COMMAND_SIZE];
                    match mem.read_slice(&mut b, d.addr()) {
                        Ok(()) => cmd = Some(b),
                        Err(_) => cmd_bad = true,
                    }
                }
            } else if completion.is_none() && d.len() >= 16 {
                completion = Some(d.addr().0);
            }
        }
        let (Some(cmd), Some(completion)) = (cmd, completion) else {
            if q.add_used(&*mem, head, 0).is_err() {
                c.queue = None;
            }
            self.device_error(DeviceError::BadChain, ch as u32);
            return Progress::Busy;
        };
        match Job::validate(&cmd) {
            Ok(job) => {
                c.active = Some(Active {
                    head,
                    completion,
                    opcode: job.opcode(),
                    job,
                    stalled: false,
                });
            }
            Err(status) => {
                self.complete(ch, head, completion, Job::raw_opcode(&cmd), status, 0);
            }
        }
        Progress::Busy
    }

    fn complete(
        &mut self,
        ch: usize,
        head: u16,
        completion: u64,
        op: u32,
        status: Status,
        result: u64,
    ) {
        self.counters.command_done(op, status);
        let mut rec = [0u8; 16];
        rec[0..4].copy_from_slice(&(status as u32).to_le_bytes());
        rec[8..16].copy_from_slice(&result.to_le_bytes());
        let wrote = self.mem.write_slice(&rec, GuestAddress(completion)).is_ok();
        let Some(q) = self.channels[ch].queue.as_mut() else {
            return;
        };
        let used_len = if wrote { 16 } else { 0 };
        let event_idx = q.event_idx_enabled();
        let avail = q.avail_ring();
        let notify = q
            .add_used(&self.mem, head, used_len)
            .and_then(|()| q.needs_notification(&self.mem))
            .map(|n| {
                // virtio-queue leaves VRING_AVAIL_F_NO_INTERRUPT to us.
                n && (event_idx
                    || self
                        .mem
                        .load::<u16>(GuestAddress(avail), Ordering::Acquire)
                        .is_ok_and(|f| u16::from_le(f) & 1 == 0))
            });
        if !wrote {
            self.device_error(DeviceError::BadChain, ch as u32);
        }
        match notify {
            Ok(true) => self.raise(IntCause::CHANNEL),
            Ok(false) => {}
            Err(_) => {
                let c = &mut self.channels[ch];
                c.queue = None;
                c.error = true;
                self.device_error(DeviceError::BadQueue, ch as u32);
            }
        }
    }

    // -------------------------------------------------------------- faults

    fn fault_space(&mut self) -> u32 {
        let Some(get) = self.sb_load(status_block::FAULT_GET) else {
            return 0;
        };
        let used = self.faults.put.wrapping_sub(get);
        // A GET ahead of PUT is a driver bug: treat the buffer as full
        // rather than overwrite unread entries.
        self.live.fault_entries.saturating_sub(used)
    }

    fn write_fault(&mut self, e: &FaultEntry) -> bool {
        let slot = u64::from(self.faults.put % self.live.fault_entries);
        let addr = self.live.fault_buf + slot * 32;
        if self
            .mem
            .write_slice(&entry_bytes(e), GuestAddress(addr))
            .is_err()
        {
            self.device_error(DeviceError::MemoryError, 0);
            return false;
        }
        self.faults.put = self.faults.put.wrapping_add(1);
        self.counters.inc(Counter::FaultsRaised);
        true
    }

    fn record_faults(&mut self) {
        if self.scratch.is_empty() {
            return;
        }
        let recs = std::mem::take(&mut self.scratch);
        let now = self.now();
        let mut space = None;
        let (mut wrote, mut overflowed) = (false, false);
        for r in &recs {
            if !self.faults.pending.insert((r.ctx, r.page, r.access)) {
                self.counters.inc(Counter::FaultsDeduplicated);
                continue;
            }
            let e = FaultEntry {
                va: r.page,
                timestamp: now,
                context: r.ctx,
                access: r.access as u8,
                reason: r.reason as u8,
                engine: r.engine,
                channel: r.channel,
                info: r.info,
                _reserved: 0,
            };
            let space = space.get_or_insert_with(|| self.fault_space());
            if *space > 0 && self.faults.unreported.is_empty() {
                if self.write_fault(&e) {
                    *space -= 1;
                    wrote = true;
                }
            } else {
                self.counters.inc(Counter::FaultOverflows);
                self.faults.unreported.push_back(e);
                if !self.faults.overflow {
                    self.faults.overflow = true;
                    overflowed = true;
                }
            }
        }
        self.scratch = recs;
        self.scratch.clear();
        if wrote {
            self.sb_store(status_block::FAULT_PUT, self.faults.put);
        }
        if overflowed {
            self.sb_store(status_block::FAULT_FLAGS, FaultFlags::OVERFLOW.bits());
        }
        if wrote || overflowed {
            self.raise(IntCause::FAULT);
        }
    }

    fn fault_get_update(&mut self) {
        let mut space = self.fault_space();
        let mut wrote = false;
        while space > 0 {
            let Some(e) = self.faults.unreported.pop_front() else {
                break;
            };
            if !self.write_fault(&e) {
                break;
            }
            space -= 1;
            wrote = true;
        }
        if wrote {
            self.sb_store(status_block::FAULT_PUT, self.faults.put);
        }
        if self.faults.overflow && self.faults.unreported.is_empty() {
            self.faults.overflow = false;
            self.sb_store(status_block::FAULT_FLAGS, 0);
        }
        if wrote {
            self.raise(IntCause::FAULT);
        }
    }

    fn replay(&mut self) {
        self.counters.inc(Counter::Replays);
        // Every stalled access retries and reports again if it still
        // faults, so the dedup state and unwritten entries start afresh.
        self.faults.pending.clear();
        self.faults.unreported.clear();
        if self.faults.overflow {
            self.faults.overflow = false;
            self.sb_store(status_block::FAULT_FLAGS, 0);
        }
        for c in &mut self.channels {
            if let Some(a) = c.active.as_mut() {
                a.job.unstall();
                a.stalled = false;
            }
        }
        self.replay_seq = self.replay_seq.wrapping_add(1);
        self.sb_store(status_block::REPLAY_SEQ, self.replay_seq);
    }

    /// Fail stalled work of `ctx` waiting on `[start, end)` (all of it when
    /// `range` is None).
    fn cancel(&mut self, ctx: u32, range: Option<(u64, u64)>) {
        self.faults.pending.retain(|(c, page, _)| {
            *c != ctx || range.is_some_and(|(s, e)| !(*page < e && s < page + PAGE_SIZE))
        });
        for ch in 0..self.channels.len() {
            let c = &mut self.channels[ch];
            if c.context != ctx {
                continue;
            }
            let hit = c.active.as_ref().is_some_and(|a| match range {
                Some((s, e)) => a.job.waits_on(s, e),
                None => a.job.has_stall(),
            });
            if hit {
                if let Some(a) = c.active.take() {
                    self.counters.inc(Counter::Cancels);
                    self.complete(ch, a.head, a.completion, a.opcode, Status::Cancelled, 0);
                }
            }
        }
    }

    fn process_control(&mut self) {
        if self.ctl_broken {
            return;
        }
        let Some(prod) = self.sb_load(status_block::CTL_PROD) else {
            return;
        };
        let entries = self.live.ctl_entries;
        if prod.wrapping_sub(self.ctl_cons) > entries {
            self.ctl_broken = true;
            self.device_error(DeviceError::BadControlRing, prod);
            return;
        }
        let mut notify = false;
        while self.ctl_cons != prod {
            let addr = self.live.ctl_ring + u64::from(self.ctl_cons % entries) * 32;
            let mut b = [0u8; 32];
            if self.mem.read_slice(&mut b, GuestAddress(addr)).is_err() {
                self.device_error(DeviceError::MemoryError, 0);
                return;
            }
            let d = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
            let q = |o: usize| u64::from(d(o)) | (u64::from(d(o + 4)) << 32);
            let (op, ctx, flags) = (
                d(offset_of!(CtlEntry, op)),
                d(offset_of!(CtlEntry, context)),
                d(offset_of!(CtlEntry, flags)),
            );
            let (start, len) = (q(offset_of!(CtlEntry, start)), q(offset_of!(CtlEntry, len)));
            let status = self.control_op(op, ctx, start, len);
            if self
                .mem
                .store(
                    (status as u32).to_le(),
                    GuestAddress(addr + ctl_entry::STATUS),
                    Ordering::Release,
                )
                .is_err()
            {
                self.device_error(DeviceError::MemoryError, 0);
                return;
            }
            notify |= CtlFlags::from_bits_truncate(flags).contains(CtlFlags::NOTIFY);
            self.ctl_cons = self.ctl_cons.wrapping_add(1);
        }
        // The acknowledgement: TLB entries are already gone at this point.
        self.sb_store(status_block::CTL_CONS, self.ctl_cons);
        if notify {
            self.raise(IntCause::CONTROL);
        }
    }

    fn control_op(&mut self, op: u32, ctx: u32, start: u64, len: u64) -> CtlStatus {
        let ctx_ok = ctx < NUM_CONTEXTS;
        let end = start.checked_add(len).filter(|e| *e <= VA_LIMIT);
        match op {
            ctl_op::INVALIDATE_ALL => {
                self.counters.inc(Counter::Invalidations);
                self.mmu.invalidate_all();
            }
            ctl_op::INVALIDATE_CONTEXT | ctl_op::CANCEL_CONTEXT if !ctx_ok => {
                return CtlStatus::BadContext
            }
            ctl_op::INVALIDATE_CONTEXT => {
                self.counters.inc(Counter::Invalidations);
                self.mmu.invalidate_context(ctx);
            }
            ctl_op::CANCEL_CONTEXT => self.cancel(ctx, None),
            ctl_op::INVALIDATE_RANGE | ctl_op::CANCEL_RANGE if !ctx_ok => {
                return CtlStatus::BadContext
            }
            ctl_op::INVALIDATE_RANGE => {
                let Some(end) = end.filter(|_| len > 0) else {
                    return CtlStatus::BadRange;
                };
                self.counters.inc(Counter::Invalidations);
                self.mmu.invalidate_range(ctx, start, end);
            }
            ctl_op::CANCEL_RANGE => {
                let range = if len == 0 {
                    let p = start & !(PAGE_SIZE - 1);
                    (start < VA_LIMIT).then_some((p, p + PAGE_SIZE))
                } else {
                    end.map(|e| (start, e))
                };
                let Some(range) = range else {
                    return CtlStatus::BadRange;
                };
                self.cancel(ctx, Some(range));
            }
            _ => return CtlStatus::BadOp,
        }
        CtlStatus::Ok
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
