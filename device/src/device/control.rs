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
    /// of them (a bounded step). Returns `false` if some remain.
    pub(super) fn process_control(&mut self, limit: u32) -> bool {
        if self.control.broken {
            return true;
        }
        let Some(prod) = self.sb_load(status_block::CTL_PROD) else {
            return true;
        };
        let entries = self.active.ctl_entries;
        if prod.wrapping_sub(self.control.cons) > entries {
            self.control.broken = true;
            self.device_error(DeviceError::BadControlRing, prod);
            return true;
        }
        let mut notify = false;
        let mut done = 0;
        while self.control.cons != prod && done < limit {
            done += 1;
            let slot = u64::from(self.control.cons % entries);
            let addr = self.active.ctl_ring + slot * CtlEntry::SIZE as u64;
            let mut b = [0u8; CtlEntry::SIZE];
            if self.mem.read_slice(&mut b, GuestAddress(addr)).is_err() {
                self.device_error(DeviceError::MemoryError, 0);
                return true;
            }
            let e = CtlEntry::from_le_bytes(&b);
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
                return true;
            }
            notify |= CtlFlags::from_bits_truncate(e.flags).contains(CtlFlags::NOTIFY);
            self.control.cons = self.control.cons.wrapping_add(1);
        }
        // The acknowledgement: TLB entries are already gone at this point.
        self.sb_store(status_block::CTL_CONS, self.control.cons);
        if notify {
            self.raise(IntCause::CONTROL);
        }
        self.control.cons == prod
    }

    fn control_op(&mut self, op: CtlOp, ctx: u32, start: u64, len: u64) -> CtlStatus {
        let ctx_ok = ctx < NUM_CONTEXTS;
        let end = start.checked_add(len).filter(|e| *e <= VA_LIMIT);
        match op {
            CtlOp::InvalidateAll => {
                self.counters.inc(Counter::Invalidations);
                self.mmu.invalidate_all();
            }
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
