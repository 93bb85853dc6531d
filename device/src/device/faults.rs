//! The fault unit: faults the engines hit are deduplicated, written to the
//! fault buffer (or held back while it is full), and PUT is published; GET
//! updates release the held-back ones; REPLAY retries every stalled access;
//! CANCEL fails stalled work.
//!
//! Bookkeeping is bounded by what can stall: every pending fault names the
//! channels whose command in flight waits on it, and when that command
//! ends (completed, cancelled, dropped by a channel stop or a broken ring)
//! its share goes. A fault no command waits on any more is forgotten, and
//! if it was still held back it is never written. So `pending` and the
//! held-back queue hold at most one entry per stalled access
//! (`MAX_BACKLOG`), whatever the guest repeats.

use std::collections::{HashMap, VecDeque};

use faultline_abi::{
    status_block, Access, Counter, DeviceError, FaultEntry, FaultFlags, NUM_CHANNELS,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::Device;
use crate::engine::{FaultRec, MAX_STALLED_PAGES};
use crate::inject::Knob;
use crate::trace::Event;

/// Channels waiting on one fault, a bit per channel.
type Waiters = u32;
const _: () = assert!(NUM_CHANNELS <= Waiters::BITS);

/// Most faults the device can hold back: one per stalled access, i.e. per
/// distinct (context, page, access) the commands in flight wait on.
pub const MAX_BACKLOG: usize = NUM_CHANNELS as usize * MAX_STALLED_PAGES;

type Key = (u32, u64, Access);

fn key_of(e: &FaultEntry) -> Option<Key> {
    Access::from_u8(e.access).map(|a| (e.context, e.va, a))
}

#[derive(Default)]
pub(super) struct FaultUnit {
    /// The fault buffer's PUT (free-running).
    put: u32,
    /// Faults reported (or held back) and not replayed yet, by (context,
    /// page, access), with the channels whose command waits on each.
    pending: HashMap<Key, Waiters>,
    /// Channels with a bit set somewhere in `pending`.
    waiting: Waiters,
    /// Entries waiting for space in the fault buffer, oldest first; each
    /// has its key in `pending`.
    unreported: VecDeque<FaultEntry>,
    /// OVERFLOW is set in the status block.
    overflow: bool,
    /// REPLAY doorbells processed, mirrored in the status block.
    replay_seq: u32,
    /// The last `fault_space` was cut by `fault_overflow_at` (injection).
    capped: bool,
}

fn entry_of(r: &FaultRec, now: u64) -> FaultEntry {
    FaultEntry {
        va: r.page,
        timestamp: now,
        context: r.ctx,
        access: r.access as u8,
        reason: r.reason as u8,
        engine: r.engine,
        channel: r.channel,
        info: r.info,
        _reserved: 0,
    }
}

impl<M: GuestMemoryBackend> Device<M> {
    fn fault_space(&mut self) -> u32 {
        let Some(get) = self.sb_load(status_block::FAULT_GET) else {
            return 0;
        };
        let used = self.faults.put.wrapping_sub(get);
        // A GET ahead of PUT is a driver bug: treat the buffer as full
        // rather than overwrite unread entries.
        let space = self.active.fault_entries.saturating_sub(used);
        let Some(at) = self
            .inject
            .as_deref()
            .map(|i| i.spec.fault_overflow_at)
            .filter(|a| *a != 0)
        else {
            return space;
        };
        let capped = at.saturating_sub(used);
        self.faults.capped = capped < space;
        capped.min(space)
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
        self.trace_event(Event::FaultRaised {
            context: e.context,
            va: e.va,
            access: e.access,
            channel: e.channel,
        });
        true
    }

    /// Report the faults queued during this step: one FAULT interrupt for
    /// all of them.
    pub(super) fn record_faults(&mut self) {
        if self.queued_faults.is_empty()
            && self.inject.as_deref().is_none_or(|i| i.spurious.is_empty())
        {
            return;
        }
        let mut recs = std::mem::take(&mut self.queued_faults);
        if let Some(inj) = self.inject.as_deref_mut() {
            if inj.spec.fault_reorder && recs.len() > 1 {
                // Fisher-Yates, from the one PRNG.
                for i in (1..recs.len()).rev() {
                    recs.swap(i, inj.rng.below(i + 1));
                }
                inj.fire(Knob::FaultReorder);
            }
        }
        let now = self.now();
        let mut space = None;
        let (mut wrote, mut overflowed) = (false, false);
        for r in &recs {
            let bit: Waiters = 1 << r.channel;
            self.faults.waiting |= bit;
            match self.faults.pending.entry((r.ctx, r.page, r.access)) {
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    *o.get_mut() |= bit;
                    self.counters.inc(Counter::FaultsDeduplicated);
                    continue;
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(bit);
                }
            }
            let e = entry_of(r, now);
            let space = space.get_or_insert_with(|| self.fault_space());
            if *space > 0 && self.faults.unreported.is_empty() {
                if self.write_fault(&e) {
                    *space -= 1;
                    wrote = true;
                    // A duplicate only where there is room: it is never
                    // held back, so the backlog bound stays.
                    if *space > 0 && self.inject_dup() && self.write_fault(&e) {
                        *space -= 1;
                    }
                }
            } else {
                self.counters.inc(Counter::FaultOverflows);
                if self.faults.capped {
                    if let Some(inj) = self.inject.as_deref_mut() {
                        inj.fire(Knob::FaultOverflowAt);
                    }
                }
                // Cannot exceed the bound (one entry per stalled access);
                // should it ever, OVERFLOW alone says so and the stalled
                // access reports again on REPLAY.
                if self.faults.unreported.len() < MAX_BACKLOG {
                    self.faults.unreported.push_back(e);
                    self.counters
                        .note_fault_backlog(self.faults.unreported.len());
                }
                if !self.faults.overflow {
                    self.faults.overflow = true;
                    overflowed = true;
                }
            }
        }
        // The buffer's capacity is kept for the next step.
        self.queued_faults = recs;
        self.queued_faults.clear();
        if let Some(inj) = self.inject.as_deref_mut() {
            let spurious = std::mem::take(&mut inj.spurious);
            wrote |= self.report_spurious(&spurious, now, &mut space);
            if let Some(inj) = self.inject.as_deref_mut() {
                inj.spurious = spurious;
                inj.spurious.clear();
            }
        }
        if wrote {
            self.sb_store(status_block::FAULT_PUT, self.faults.put);
        }
        if overflowed {
            self.sb_store(status_block::FAULT_FLAGS, FaultFlags::OVERFLOW.bits());
        }
        if wrote || overflowed {
            self.raise_fault();
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
            self.raise_fault();
        }
    }

    /// Fault injection's `fault_dup`: whether to write the entry just
    /// written again.
    fn inject_dup(&mut self) -> bool {
        let Some(inj) = self.inject.as_deref_mut() else {
            return false;
        };
        let dup = inj.rng.chance(inj.spec.fault_dup_ppm);
        if dup {
            inj.fire(Knob::FaultDup);
        }
        dup
    }

    /// Fault injection's `spurious`: report faults for accesses that
    /// translated fine. They are no pending faults (nothing waits on them,
    /// so they neither deduplicate a real fault nor are held back): without
    /// room in the buffer they are not reported.
    fn report_spurious(&mut self, recs: &[FaultRec], now: u64, space: &mut Option<u32>) -> bool {
        let mut wrote = false;
        for r in recs {
            let space = space.get_or_insert_with(|| self.fault_space());
            if *space == 0 || !self.faults.unreported.is_empty() {
                break;
            }
            if !self.write_fault(&entry_of(r, now)) {
                break;
            }
            *space -= 1;
            wrote = true;
            if let Some(inj) = self.inject.as_deref_mut() {
                inj.fire(Knob::Spurious);
            }
        }
        wrote
    }

    /// DB_REPLAY.
    pub(super) fn replay(&mut self) {
        self.counters.inc(Counter::Replays);
        // Every stalled access retries and reports again if it still
        // faults, so the dedup state and unwritten entries start afresh.
        self.faults.pending.clear();
        self.faults.waiting = 0;
        self.faults.unreported.clear();
        if self.faults.overflow {
            self.faults.overflow = false;
            self.sb_store(status_block::FAULT_FLAGS, 0);
        }
        self.unstall_channels();
        self.faults.replay_seq = self.faults.replay_seq.wrapping_add(1);
        self.sb_store(status_block::REPLAY_SEQ, self.faults.replay_seq);
        let seq = self.faults.replay_seq;
        self.trace_event(Event::Replay { seq });
    }

    /// CTL FLUSH_FAULTS: forget the held-back entries and OVERFLOW. Their
    /// keys stay in `pending` until the REPLAY the driver rings next (which
    /// clears it), so a stalled access does not report twice before it.
    pub(super) fn flush_faults(&mut self) {
        self.faults.unreported.clear();
        if self.faults.overflow {
            self.faults.overflow = false;
            self.sb_store(status_block::FAULT_FLAGS, 0);
        }
    }

    /// Fail stalled work of `ctx` waiting on `[start, end)` (all of it when
    /// `range` is None).
    /// Their faults go with them (`release_faults`).
    pub(super) fn cancel(&mut self, ctx: u32, range: Option<(u64, u64)>) {
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

impl<M: GuestMemoryBackend> Device<M> {
    /// The command in flight on channel `ch` ended (completed, cancelled or
    /// dropped): it waits on nothing any more. Faults only it waited on are
    /// forgotten, held-back ones are never written, and faults it hit in
    /// this step are not recorded.
    pub(super) fn release_faults(&mut self, ch: usize) {
        if !self.queued_faults.is_empty() {
            self.queued_faults.retain(|f| usize::from(f.channel) != ch);
        }
        let bit: Waiters = 1 << ch;
        let f = &mut self.faults;
        if f.waiting & bit == 0 {
            return;
        }
        f.waiting &= !bit;
        f.pending.retain(|_, w| {
            *w &= !bit;
            *w != 0
        });
        let pending = &f.pending;
        f.unreported
            .retain(|e| key_of(e).is_some_and(|k| pending.contains_key(&k)));
        if f.overflow && f.unreported.is_empty() && self.enabled {
            // Nothing held back any more: the buffer did not lose anything
            // a command still waits on.
            f.overflow = false;
            self.sb_store(status_block::FAULT_FLAGS, 0);
        }
    }

    /// Faults held back for want of space in the fault buffer (diagnostics
    /// and tests; bounded by `MAX_BACKLOG`).
    pub fn fault_backlog(&self) -> usize {
        self.faults.unreported.len()
    }

    /// Faults reported or held back that commands still wait on.
    pub fn faults_pending(&self) -> usize {
        self.faults.pending.len()
    }
}
