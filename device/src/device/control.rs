//! The control ring: entries are read in order, executed (TLB invalidation
//! on the MMU, CANCEL on the fault unit), answered with a status, and
//! acknowledged by advancing `ctl_cons`.

use std::sync::atomic::Ordering;

use faultline_abi::{
    status_block, Counter, CtlEntry, CtlFlags, CtlOp, CtlStatus, DeviceError, IntCause,
    NUM_CONTEXTS, PAGE_SIZE, VA_LIMIT,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::Device;

/// How far one `process_control` call got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CtlProgress {
    /// Every submitted entry is acknowledged.
    Done,
    /// The step's budget ran out; entries remain.
    More,
    /// An invalidate overlaps a translation a paused engine holds (fault
    /// injection, `engine_stall_us`): its TLB entries are gone, but it is
    /// acknowledged only once that access completed, as a GPU drains
    /// in-flight accesses before it acks.
    Blocked,
}

#[derive(Default)]
pub(super) struct ControlRing {
    /// Entries completed (free-running), mirrored as `ctl_cons`.
    cons: u32,
    /// The producer index ran ahead of the ring: ignore it until the next
    /// enable.
    broken: bool,
}

impl<M: GuestMemoryBackend> Device<M> {
    /// DB_CONTROL: run the entries the driver submitted, at most `limit`
    /// of them (a bounded step).
    pub(super) fn process_control(&mut self, limit: u32) -> CtlProgress {
        if self.control.broken {
            return CtlProgress::Done;
        }
        let Some(prod) = self.sb_load(status_block::CTL_PROD) else {
            return CtlProgress::Done;
        };
        let entries = self.active.ctl_entries;
        if prod.wrapping_sub(self.control.cons) > entries {
            self.control.broken = true;
            self.device_error(DeviceError::BadControlRing, prod);
            return CtlProgress::Done;
        }
        let mut notify = false;
        let mut blocked = false;
        let mut done = 0;
        while self.control.cons != prod && done < limit {
            done += 1;
            let slot = u64::from(self.control.cons % entries);
            let addr = self.active.ctl_ring + slot * CtlEntry::SIZE as u64;
            let mut b = [0u8; CtlEntry::SIZE];
            if self.mem.read_slice(&mut b, GuestAddress(addr)).is_err() {
                self.device_error(DeviceError::MemoryError, 0);
                return CtlProgress::Done;
            }
            let e = CtlEntry::from_le_bytes(&b);
            if self.trace.is_some() {
                self.trace_ctl(self.control.cons, &e);
            }
            if self.inject.is_some() && self.held_blocks(&e) {
                blocked = true;
                break;
            }
            let status = match CtlOp::from_u32(e.op) {
                Some(op) => self.control_op(op, e.context, e.start, e.len),
                None => CtlStatus::BadOp,
            };
            let status_at = addr + CtlEntry::STATUS_OFFSET as u64;
            if self
                .mem
                .store(
                    (status as u32).to_le(),
                    GuestAddress(status_at),
                    Ordering::Release,
                )
                .is_err()
            {
                self.device_error(DeviceError::MemoryError, 0);
                return CtlProgress::Done;
            }
            notify |= CtlFlags::from_bits_truncate(e.flags).contains(CtlFlags::NOTIFY);
            self.control.cons = self.control.cons.wrapping_add(1);
        }
        // The acknowledgement: TLB entries are already gone at this point.
        self.sb_store(status_block::CTL_CONS, self.control.cons);
        if done > 0 {
            let cons = self.control.cons;
            self.trace_event(crate::trace::Event::CtlAck { cons });
        }
        if notify {
            self.raise(IntCause::CONTROL);
        }
        if blocked {
            CtlProgress::Blocked
        } else if self.control.cons == prod {
            CtlProgress::Done
        } else {
            CtlProgress::More
        }
    }

    /// Whether invalidate `e` must wait for a paused engine's access: it
    /// overlaps a translation one holds. The TLB entries go at once (so no
    /// new access can use them); the acknowledgement waits. Executed again
    /// in full when unblocked, which is harmless for an invalidate.
    fn held_blocks(&mut self, e: &CtlEntry) -> bool {
        let (ctx, range) = match CtlOp::from_u32(e.op) {
            Some(CtlOp::InvalidateAll) => (None, (0, VA_LIMIT)),
            Some(CtlOp::InvalidateContext) => (Some(e.context), (0, VA_LIMIT)),
            Some(CtlOp::InvalidateRange) => match e.start.checked_add(e.len) {
                Some(end) if e.len > 0 && end <= VA_LIMIT => (Some(e.context), (e.start, end)),
                _ => return false,
            },
            _ => return false,
        };
        let hit = self
            .channels
            .iter()
            .any(|c| ctx.is_none_or(|x| c.context() == x) && c.held_overlaps(range.0, range.1));
        if hit {
            match ctx {
                None => self.mmu.invalidate_all(),
                Some(x) if range == (0, VA_LIMIT) => self.mmu.invalidate_context(x),
                Some(x) => self.mmu.invalidate_range(x, range.0, range.1),
            }
        }
        hit
    }

    fn control_op(&mut self, op: CtlOp, ctx: u32, start: u64, len: u64) -> CtlStatus {
        let ctx_ok = ctx < NUM_CONTEXTS;
        let end = start.checked_add(len).filter(|e| *e <= VA_LIMIT);
        match op {
            CtlOp::InvalidateAll => {
                self.counters.inc(Counter::Invalidations);
                self.mmu.invalidate_all();
            }
            CtlOp::FlushFaults => self.flush_faults(),
            _ if !ctx_ok => return CtlStatus::BadContext,
            CtlOp::InvalidateContext => {
                self.counters.inc(Counter::Invalidations);
                self.mmu.invalidate_context(ctx);
            }
            CtlOp::CancelContext => self.cancel(ctx, None),
            CtlOp::InvalidateRange => {
                let Some(end) = end.filter(|_| len > 0) else {
                    return CtlStatus::BadRange;
                };
                self.counters.inc(Counter::Invalidations);
                self.mmu.invalidate_range(ctx, start, end);
            }
            CtlOp::CancelRange => {
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
        }
        CtlStatus::Ok
    }
}
