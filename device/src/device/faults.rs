//! The fault unit: faults the engines hit are deduplicated, written to the
//! fault buffer (or held back while it is full), and PUT is published; GET
//! updates release the held-back ones; REPLAY retries every stalled access;
//! CANCEL fails stalled work.

use std::collections::{HashSet, VecDeque};

use faultline_abi::{
    status_block, Access, Counter, DeviceError, FaultEntry, FaultFlags, IntCause, PAGE_SIZE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::Device;

#[derive(Default)]
pub(super) struct FaultUnit {
    /// The fault buffer's PUT (free-running).
    put: u32,
    /// Faults reported and not replayed yet: (context, page, access).
    pending: HashSet<(u32, u64, Access)>,
    /// Entries waiting for space in the fault buffer, oldest first.
    unreported: VecDeque<FaultEntry>,
    /// OVERFLOW is set in the status block.
    overflow: bool,
    /// REPLAY doorbells processed, mirrored in the status block.
    replay_seq: u32,
}

impl<M: GuestMemoryBackend> Device<M> {
    fn fault_space(&mut self) -> u32 {
        let Some(get) = self.sb_load(status_block::FAULT_GET) else {
            return 0;
        };
        let used = self.faults.put.wrapping_sub(get);
        // A GET ahead of PUT is a driver bug: treat the buffer as full
        // rather than overwrite unread entries.
        self.active.fault_entries.saturating_sub(used)
    }

    fn write_fault(&mut self, e: &FaultEntry) -> bool {
        let slot = u64::from(self.faults.put % self.active.fault_entries);
        let addr = self.active.fault_buf + slot * FaultEntry::SIZE as u64;
        if self
            .mem
            .write_slice(&e.to_le_bytes(), GuestAddress(addr))
            .is_err()
        {
            self.device_error(DeviceError::MemoryError, 0);
            return false;
        }
        self.faults.put = self.faults.put.wrapping_add(1);
        self.counters.inc(Counter::FaultsRaised);
        true
    }

    /// Report the faults queued during this step: one FAULT interrupt for
    /// all of them.
    pub(super) fn record_faults(&mut self) {
        if self.queued_faults.is_empty() {
            return;
        }
        let recs = std::mem::take(&mut self.queued_faults);
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
        // The buffer's capacity is kept for the next step.
        self.queued_faults = recs;
        self.queued_faults.clear();
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

    /// DB_FAULT_GET: the driver freed entries; write held-back faults.
    pub(super) fn fault_get_update(&mut self) {
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

    /// DB_REPLAY.
    pub(super) fn replay(&mut self) {
        self.counters.inc(Counter::Replays);
        // Every stalled access retries and reports again if it still
        // faults, so the dedup state and unwritten entries start afresh.
        self.faults.pending.clear();
        self.faults.unreported.clear();
        if self.faults.overflow {
            self.faults.overflow = false;
            self.sb_store(status_block::FAULT_FLAGS, 0);
        }
        self.unstall_channels();
        self.faults.replay_seq = self.faults.replay_seq.wrapping_add(1);
        self.sb_store(status_block::REPLAY_SEQ, self.faults.replay_seq);
    }

    /// Fail stalled work of `ctx` waiting on `[start, end)` (all of it when
    /// `range` is None).
    pub(super) fn cancel(&mut self, ctx: u32, range: Option<(u64, u64)>) {
        self.faults.pending.retain(|(c, page, _)| {
            *c != ctx || range.is_some_and(|(s, e)| !(*page < e && s < page + PAGE_SIZE))
        });
        for ch in 0..self.channels.len() {
            let c = &self.channels[ch];
            let hit = c.context() == ctx
                && c.job().is_some_and(|job| match range {
                    Some((s, e)) => job.waits_on(s, e),
                    None => job.has_stall(),
                });
            if hit {
                self.counters.inc(Counter::Cancels);
                self.cancel_in_flight(ch);
            }
        }
    }
}
