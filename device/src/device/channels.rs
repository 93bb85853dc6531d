//! Channels: one split virtqueue each (consumed with `virtio-queue`), its
//! registers, the command in flight, and completion (status written, chain
//! returned, CHANNEL interrupt when the driver asked for one).

use std::sync::atomic::Ordering;

use faultline_abi::{
    regs, virtq, ChannelFlags, ChannelStatus, Completion, DeviceError, IntCause, Opcode, Status,
    COMMAND_SIZE, MAX_QUEUE_SIZE, NUM_CONTEXTS,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::regs::{set_hi, set_lo};
use super::Device;
use crate::engine::{Env, Job, Outcome};

/// The command a channel is executing.
struct InFlight {
    head: u16,
    /// GPA of the chain's writable descriptor, where the completion goes.
    completion: u64,
    job: Job,
    stalled: bool,
}

#[derive(Default)]
pub(super) struct Channel {
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
    in_flight: Option<InFlight>,
}

pub(super) enum Progress {
    Idle,
    Busy,
}

impl Channel {
    /// Register `reg` of the channel block.
    pub(super) fn read_reg(&self, reg: u64) -> u32 {
        match reg {
            regs::CH_QUEUE_SIZE => self.size,
            regs::CH_DESC_LO => self.desc as u32,
            regs::CH_DESC_HI => (self.desc >> 32) as u32,
            regs::CH_AVAIL_LO => self.avail as u32,
            regs::CH_AVAIL_HI => (self.avail >> 32) as u32,
            regs::CH_USED_LO => self.used as u32,
            regs::CH_USED_HI => (self.used >> 32) as u32,
            regs::CH_CONTEXT => self.context,
            regs::CH_FLAGS => self.flags,
            regs::CH_ENABLE => {
                let mut s = ChannelStatus::empty();
                s.set(ChannelStatus::RUNNING, self.queue.is_some());
                s.set(ChannelStatus::ERROR, self.error);
                s.bits()
            }
            _ => 0,
        }
    }

    /// Write setup register `reg` (not CH_ENABLE); ignored while running.
    pub(super) fn write_reg(&mut self, reg: u64, v: u32) {
        if self.queue.is_some() {
            return;
        }
        match reg {
            regs::CH_QUEUE_SIZE => self.size = v,
            regs::CH_DESC_LO => set_lo(&mut self.desc, v),
            regs::CH_DESC_HI => set_hi(&mut self.desc, v),
            regs::CH_AVAIL_LO => set_lo(&mut self.avail, v),
            regs::CH_AVAIL_HI => set_hi(&mut self.avail, v),
            regs::CH_USED_LO => set_lo(&mut self.used, v),
            regs::CH_USED_HI => set_hi(&mut self.used, v),
            regs::CH_CONTEXT => self.context = v,
            regs::CH_FLAGS => self.flags = v,
            _ => {}
        }
    }

    /// The context the channel's commands run in.
    pub(super) fn context(&self) -> u32 {
        self.context
    }

    /// When the paused access of the command in flight runs (fault
    /// injection), if one is paused.
    pub(super) fn held_until(&self) -> Option<u64> {
        self.in_flight.as_ref().and_then(|f| f.job.held_until())
    }

    /// Whether the command in flight holds a translation of a page in
    /// `[start, end)` for a paused access.
    pub(super) fn held_overlaps(&self, start: u64, end: u64) -> bool {
        self.in_flight
            .as_ref()
            .is_some_and(|f| f.job.held_overlaps(start, end))
    }

    /// The command in flight, if any.
    pub(super) fn job(&self) -> Option<&Job> {
        self.in_flight.as_ref().map(|f| &f.job)
    }
}

impl<M: GuestMemoryBackend> Device<M> {
    pub(super) fn channel_enable(&mut self, ch: usize) {
        let c = &self.channels[ch];
        if c.queue.is_some() {
            return;
        }
        let ok = self.enabled
            && c.size.is_power_of_two()
            && c.size <= u32::from(MAX_QUEUE_SIZE)
            && c.desc.is_multiple_of(virtq::DESC_ALIGN)
            && c.avail.is_multiple_of(virtq::AVAIL_ALIGN)
            && c.used.is_multiple_of(virtq::USED_ALIGN)
            && c.context < NUM_CONTEXTS
            && {
                // A power of two up to MAX_QUEUE_SIZE fits a u16.
                let n = c.size as u16;
                let bytes = |b: usize| b as u64;
                self.range_in_ram(c.desc, bytes(virtq::desc_table_size(n)))
                    && self.range_in_ram(c.avail, bytes(virtq::avail_ring_size(n)))
                    && self.range_in_ram(c.used, bytes(virtq::used_ring_size(n)))
            };
        let queue = ok.then(|| self.make_queue(ch)).flatten();
        let c = &mut self.channels[ch];
        c.error = queue.is_none();
        c.notify_off = false;
        c.in_flight = None;
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

    /// CH_ENABLE=0 (also disable, RESET, a broken ring): the command in
    /// flight is dropped without completion, and the faults it waited on
    /// with it.
    pub(super) fn channel_stop(&mut self, ch: usize) {
        let c = &mut self.channels[ch];
        c.queue = None;
        c.in_flight = None;
        self.release_faults(ch);
    }

    /// The queue broke (the guest corrupted a ring): stop the channel.
    fn queue_broken(&mut self, ch: usize) {
        self.channel_stop(ch);
        self.channels[ch].error = true;
        self.device_error(DeviceError::BadQueue, ch as u32);
    }

    /// One slice of channel `ch`: run its command in flight, or take the
    /// next chain off the avail ring.
    pub(super) fn run_channel(&mut self, ch: usize) -> Progress {
        let Self {
            mem,
            vram,
            mmu,
            counters,
            queued_faults,
            channels,
            launch_step_limit,
            inject,
            clock,
            ..
        } = self;
        let c = &mut channels[ch];
        let Some(q) = c.queue.as_mut() else {
            return Progress::Idle;
        };
        if let Some(f) = c.in_flight.as_mut() {
            if f.stalled {
                return Progress::Idle;
            }
            // Only fault injection pauses accesses, or needs the time.
            let now = match inject {
                Some(_) => clock.now(),
                None => 0,
            };
            if f.job.held_until().is_some_and(|t| t > now) {
                return Progress::Idle;
            }
            let mut env = Env {
                mem: &*mem,
                vram: &*vram,
                mmu,
                counters,
                faults: queued_faults,
                ctx: c.context,
                channel: ch as u8,
                launch_step_limit: *launch_step_limit,
                inject: inject.as_deref_mut(),
                now,
            };
            match f.job.run(&mut env) {
                Outcome::Done(status, result) => {
                    let Some(f) = c.in_flight.take() else {
                        return Progress::Idle;
                    };
                    let op = f.job.opcode();
                    self.complete(ch, f.head, f.completion, op, status, result);
                }
                Outcome::Stalled => f.stalled = true,
                // Resumed by the deadline (`Device::next_deadline`).
                Outcome::Paused => return Progress::Idle,
                Outcome::Yield => {}
            }
            return Progress::Busy;
        }
        let chain = match q.iter(&*mem) {
            Ok(mut it) => it.next(),
            Err(_) => {
                self.queue_broken(ch);
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
                    self.queue_broken(ch);
                    Progress::Idle
                }
            };
        };
        if !c.notify_off {
            c.notify_off = true;
            let _ = q.disable_notification(&*mem);
        }
        let head = chain.head_index();
        if u32::from(head) >= c.size {
            // A head no descriptor has: the ring itself is corrupt (the
            // chain could not even be returned), so the queue is broken.
            self.queue_broken(ch);
            return Progress::Idle;
        }
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
            } else if completion.is_none() && d.len() as usize >= Completion::SIZE {
                completion = Some(d.addr().0);
            }
        }
        let (Some(cmd), Some(completion)) = (cmd, completion) else {
            if q.add_used(&*mem, head, 0).is_err() {
                self.queue_broken(ch);
                return Progress::Idle;
            }
            self.device_error(DeviceError::BadChain, ch as u32);
            return Progress::Busy;
        };
        let opcode = Opcode::of(&cmd).map_or(0, |o| o as u8);
        self.trace_event(crate::trace::Event::CmdStart {
            channel: ch as u8,
            opcode,
        });
        let c = &mut self.channels[ch];
        match Job::decode(&cmd) {
            Ok(job) => {
                c.in_flight = Some(InFlight {
                    head,
                    completion,
                    job,
                    stalled: false,
                });
            }
            Err(status) => {
                self.complete(ch, head, completion, Opcode::of(&cmd), status, 0);
            }
        }
        Progress::Busy
    }

    /// Write the completion, return the chain, interrupt if asked to.
    fn complete(
        &mut self,
        ch: usize,
        head: u16,
        completion: u64,
        op: Option<Opcode>,
        status: Status,
        result: u64,
    ) {
        self.release_faults(ch);
        self.counters.command_done(op, status);
        self.trace_event(crate::trace::Event::CmdComplete {
            channel: ch as u8,
            opcode: op.map_or(0, |o| o as u8),
            status: status as u8,
        });
        let rec = Completion {
            status: status as u32,
            result,
            ..Completion::default()
        };
        let wrote = self
            .mem
            .write_slice(&rec.to_le_bytes(), GuestAddress(completion))
            .is_ok();
        let Some(q) = self.channels[ch].queue.as_mut() else {
            return;
        };
        let used_len = if wrote { Completion::SIZE as u32 } else { 0 };
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
                        .load::<u16>(
                            GuestAddress(avail + virtq::RING_FLAGS as u64),
                            Ordering::Acquire,
                        )
                        .is_ok_and(|f| u16::from_le(f) & virtq::AVAIL_F_NO_INTERRUPT == 0))
            });
        if !wrote {
            self.device_error(DeviceError::BadChain, ch as u32);
        }
        match notify {
            Ok(true) => self.raise(IntCause::CHANNEL),
            Ok(false) => {}
            Err(_) => self.queue_broken(ch),
        }
    }

    /// Complete the command in flight on channel `ch` with `Cancelled`.
    pub(super) fn cancel_in_flight(&mut self, ch: usize) {
        if let Some(f) = self.channels[ch].in_flight.take() {
            self.complete(
                ch,
                f.head,
                f.completion,
                f.job.opcode(),
                Status::Cancelled,
                0,
            );
        }
    }

    /// REPLAY: every stalled command may run again.
    pub(super) fn unstall_channels(&mut self) {
        for c in &mut self.channels {
            if let Some(f) = c.in_flight.as_mut() {
                f.job.unstall();
                f.stalled = false;
            }
        }
    }
}
