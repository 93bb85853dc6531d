//! Channels: split virtqueues in DMA memory carrying commands for one
//! context, and the wait for their completions.

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::mem::ManuallyDrop;
use core::sync::atomic::{fence, Ordering};

use faultline_abi::virtq::{self, Descriptor, UsedElem};
use faultline_abi::{
    doorbell, regs, ChannelStatus, Command, Completion, DeviceError, Status, COMMAND_SIZE,
    PAGE_SIZE,
};

use super::context::Context;
use super::{DmaRegion, Gpu, GpuError, Platform};
use crate::sync::SpinMutex;

/// A submitted command; redeem it with [`Channel::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a ticket must be waited for"]
pub struct Ticket {
    seq: u64,
    errors: u32,
}

struct ChanState {
    avail_idx: u16,
    used_idx: u16,
    next_seq: u64,
    /// Sequence number of the command occupying each slot.
    slot_seq: Vec<Option<u64>>,
    free: Vec<u16>,
    /// Completed commands nobody has waited for yet: (status, result, len).
    done: BTreeMap<u64, (u32, u64, u32)>,
}

/// What a completion holds until the device writes it.
const COMPLETION_PENDING: Completion = Completion {
    status: u32::MAX,
    _reserved: 0,
    result: 0,
};

/// Byte offset of command slot `slot` in the command area.
fn cmd_off(slot: usize) -> usize {
    slot * COMMAND_SIZE
}

/// Byte offset of slot `slot`'s completion: completions follow the `slots`
/// command slots.
fn comp_off(slots: usize, slot: usize) -> usize {
    slots * COMMAND_SIZE + slot * Completion::SIZE
}

/// A running channel bound to one context.
pub struct Channel<P: Platform> {
    gpu: Arc<Gpu<P>>,
    index: u32,
    context: u32,
    size: u16,
    avail_off: usize,
    used_off: usize,
    ring: ManuallyDrop<DmaRegion>,
    cmds: ManuallyDrop<DmaRegion>,
    st: SpinMutex<ChanState>,
}

impl<P: Platform> Channel<P> {
    /// Opens a free channel on `ctx`: allocates the virtqueue and the
    /// command slots, programs and enables the channel. The channel must be
    /// dropped before the context (commands would fail `InvalidContext`).
    pub fn open(ctx: &Context<P>) -> Result<Self, GpuError> {
        let gpu = ctx.gpu().clone();
        let p = gpu.platform().clone();
        let n = gpu.config().queue_size;
        let avail_off = virtq::desc_table_size(n);
        let used_off =
            (avail_off + virtq::avail_ring_size(n)).next_multiple_of(virtq::USED_ALIGN as usize);
        let ring_bytes = used_off + virtq::used_ring_size(n);
        let slots = usize::from(n) / 2;
        let cmd_bytes = slots * (COMMAND_SIZE + Completion::SIZE);
        let index = gpu.alloc_channel()?;
        let pages = |b: usize| (b as u64).div_ceil(PAGE_SIZE) as usize;
        let Some(ring) = p.dma_alloc(pages(ring_bytes)) else {
            gpu.free_channel(index);
            return Err(GpuError::NoMemory);
        };
        let Some(cmds) = p.dma_alloc(pages(cmd_bytes)) else {
            p.dma_free(ring);
            gpu.free_channel(index);
            return Err(GpuError::NoMemory);
        };
        // Fixed descriptor pairs: 2s = command slot s, 2s+1 = its completion.
        for s in 0..slots {
            let command = Descriptor {
                addr: cmds.phys() + cmd_off(s) as u64,
                len: COMMAND_SIZE as u32,
                flags: virtq::DESC_F_NEXT,
                next: (2 * s + 1) as u16,
            };
            let completion = Descriptor {
                addr: cmds.phys() + comp_off(slots, s) as u64,
                len: Completion::SIZE as u32,
                flags: virtq::DESC_F_WRITE,
                next: 0,
            };
            let d = 2 * s * Descriptor::SIZE;
            ring.write_array(d, &command.to_le_bytes());
            ring.write_array(d + Descriptor::SIZE, &completion.to_le_bytes());
        }
        let ch = |r| regs::channel_reg(index, r);
        let w64 = |lo: u64, v: u64| {
            p.write32(ch(lo), v as u32);
            p.write32(regs::upper_half(ch(lo)), (v >> 32) as u32);
        };
        p.write32(ch(regs::CH_QUEUE_SIZE), u32::from(n));
        w64(regs::CH_DESC_LO, ring.phys());
        w64(regs::CH_AVAIL_LO, ring.phys() + avail_off as u64);
        w64(regs::CH_USED_LO, ring.phys() + used_off as u64);
        p.write32(ch(regs::CH_CONTEXT), ctx.index());
        p.write32(ch(regs::CH_FLAGS), 0);
        fence(Ordering::Release);
        p.write32(ch(regs::CH_ENABLE), 1);
        let status = p.read32(ch(regs::CH_ENABLE));
        let chan = Channel {
            gpu: gpu.clone(),
            index,
            context: ctx.index(),
            size: n,
            avail_off,
            used_off,
            ring: ManuallyDrop::new(ring),
            cmds: ManuallyDrop::new(cmds),
            st: SpinMutex::new(ChanState {
                avail_idx: 0,
                used_idx: 0,
                next_seq: 0,
                slot_seq: alloc::vec![None; slots],
                free: (0..slots as u16).rev().collect(),
                done: BTreeMap::new(),
            }),
        };
        if status & ChannelStatus::RUNNING.bits() == 0 {
            return Err(GpuError::Device {
                code: DeviceError::BadChannelSetup as u32,
                info: index,
            });
        }
        Ok(chan)
    }

    /// Channel number.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Context the channel's commands run in.
    pub fn context(&self) -> u32 {
        self.context
    }

    fn slots(&self) -> usize {
        usize::from(self.size) / 2
    }

    /// Moves completed commands from the used ring to `done`.
    fn reclaim(&self, st: &mut ChanState) {
        let idx = self.ring.read_u16(self.used_off + virtq::RING_IDX);
        fence(Ordering::Acquire);
        while st.used_idx != idx {
            let e = self.used_off + virtq::used_entry(st.used_idx % self.size);
            let used = UsedElem::from_le_bytes(&self.ring.read_array(e));
            st.used_idx = st.used_idx.wrapping_add(1);
            // The device only returns heads we posted; anything else is
            // ignored rather than trusted.
            let slot = used.id as usize / 2;
            let Some(seq) = st.slot_seq.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            let c = Completion::from_le_bytes(&self.cmds.read_array(comp_off(self.slots(), slot)));
            st.done.insert(seq, (c.status, c.result, used.len));
            st.free.push(slot as u16);
        }
    }

    /// Queues `cmd` and notifies the device if it asked for notifications.
    /// Waits (servicing faults) while every slot is in flight.
    pub fn submit(&self, cmd: &Command) -> Result<Ticket, GpuError> {
        let deadline = self.gpu.deadline();
        let words = cmd.encode();
        loop {
            {
                let mut st = self.st.lock();
                self.reclaim(&mut st);
                if let Some(slot) = st.free.pop() {
                    let slot = usize::from(slot);
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    st.slot_seq[slot] = Some(seq);
                    self.cmds.write_words(cmd_off(slot), &words);
                    self.cmds.write_array(
                        comp_off(self.slots(), slot),
                        &COMPLETION_PENDING.to_le_bytes(),
                    );
                    let ai = st.avail_idx;
                    let ring_slot = self.avail_off + virtq::avail_entry(ai % self.size);
                    self.ring.write_u16(ring_slot, (2 * slot) as u16);
                    st.avail_idx = ai.wrapping_add(1);
                    fence(Ordering::Release);
                    self.ring
                        .write_u16(self.avail_off + virtq::RING_IDX, st.avail_idx);
                    // The device re-enables notifications and re-checks the
                    // avail index before idling; order our index store
                    // before reading its flag (virtio's rule).
                    fence(Ordering::SeqCst);
                    let flags = self.ring.read_u16(self.used_off + virtq::RING_FLAGS);
                    if flags & virtq::USED_F_NO_NOTIFY == 0 {
                        self.gpu
                            .platform()
                            .write32(doorbell::offset(doorbell::channel(self.index)), 1);
                    }
                    return Ok(Ticket {
                        seq,
                        errors: self.gpu.last_error().map_or(0, |e| e.2),
                    });
                }
            }
            self.gpu.poll(true);
            self.gpu.wait_servicing(deadline, "a free channel slot")?;
        }
    }

    /// Waits for `t`'s completion, running the bottom half (fault servicing)
    /// meanwhile. `Ok(result)` for status Ok (`result` is the ATOMIC old
    /// value), `Command(status)` otherwise.
    pub fn wait(&self, t: Ticket) -> Result<u64, GpuError> {
        self.wait_with(t, true)
    }

    /// [`Channel::run`] for a command that never faults (MIGRATE), waiting
    /// without servicing faults: for callers that hold the mmap lock or
    /// pages under migration, which a fault service would need.
    pub fn run_quiet(&self, cmd: &Command) -> Result<u64, GpuError> {
        let t = self.submit(cmd)?;
        self.wait_with(t, false)
    }

    fn wait_with(&self, t: Ticket, service: bool) -> Result<u64, GpuError> {
        let deadline = self.gpu.deadline();
        loop {
            {
                let mut st = self.st.lock();
                self.reclaim(&mut st);
                if let Some((status, result, len)) = st.done.remove(&t.seq) {
                    if len == 0 {
                        return Err(GpuError::Device {
                            code: DeviceError::BadChain as u32,
                            info: self.index,
                        });
                    }
                    return match Status::from_u32(status) {
                        Some(Status::Ok) => Ok(result),
                        Some(s) => Err(GpuError::Command(s)),
                        None => Err(GpuError::BadCompletion(status)),
                    };
                }
            }
            self.gpu.poll(service);
            if let Some((code, info, n)) = self.gpu.last_error() {
                let ours = DeviceError::from_u32(code).is_some_and(DeviceError::is_channel_error)
                    && info == self.index;
                if n != t.errors && (ours || code == DeviceError::MemoryError as u32) {
                    return Err(GpuError::Device { code, info });
                }
            }
            if service {
                self.gpu.wait_servicing(deadline, "a command completion")?;
            } else {
                self.gpu.wait_slice(deadline, "a command completion")?;
            }
        }
    }

    /// Submits `cmd` and waits for it.
    pub fn run(&self, cmd: &Command) -> Result<u64, GpuError> {
        let t = self.submit(cmd)?;
        self.wait(t)
    }
}

impl<P: Platform> Drop for Channel<P> {
    fn drop(&mut self) {
        let p = self.gpu.platform().clone();
        p.write32(regs::channel_reg(self.index, regs::CH_ENABLE), 0);
        // SAFETY: never used again; the channel is stopped, so the device no
        // longer reads or writes the rings.
        let (ring, cmds) = unsafe {
            (
                ManuallyDrop::take(&mut self.ring),
                ManuallyDrop::take(&mut self.cmds),
            )
        };
        p.dma_free(ring);
        p.dma_free(cmds);
        self.gpu.free_channel(self.index);
    }
}
