//! The device's side of the fault timeline (`crate::trace`): recording
//! events, the trace registers (TRACE_CAP, the driver's trace ring, the
//! clock pairing) and reading the driver's ring into the trace. All of it
//! behind `Device::trace`, `None` unless the host asked for a trace.

use std::sync::atomic::Ordering;

use faultline_abi::{regs, trace as ring, TraceEntry, TraceHeader, MAX_TRACE_ENTRIES, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::regs::{set_hi, set_lo};
use super::Device;
use crate::trace::{Event, Trace};

/// Driver entries read per `process()` step (one slice of the driver's
/// ring; the rest the next step or at export).
pub(super) const STEP_TRACE_ENTRIES: u32 = 256;

/// The trace and the driver's ring registration.
pub(super) struct Tracing {
    pub(super) rec: Trace,
    /// TRACE_RING_LO/HI as written.
    ring_addr: u64,
    /// The registered ring: (base, entries, cons).
    ring: Option<(u64, u32, u32)>,
    tsc_lo: u32,
}

impl<M: GuestMemoryBackend> Device<M> {
    /// Record a trace from now on, keeping the last `capacity` events
    /// (`crate::trace::DEFAULT_CAPACITY` for `--gpu-trace`). A trace
    /// already recording starts afresh.
    pub fn start_trace(&mut self, capacity: usize) {
        self.trace = Some(Box::new(Tracing {
            rec: Trace::new(capacity, self.now()),
            ring_addr: 0,
            ring: None,
            tsc_lo: 0,
        }));
    }

    /// The trace so far (None unless `start_trace`), after reading what the
    /// driver's ring still holds.
    pub fn trace(&mut self) -> Option<&Trace> {
        self.drain_driver_trace(MAX_TRACE_ENTRIES);
        self.trace.as_deref().map(|t| &t.rec)
    }

    /// Write the trace as Chrome trace-event JSON (`crate::trace`); false
    /// if no trace is being recorded.
    pub fn write_trace(&mut self, w: &mut dyn std::io::Write) -> std::io::Result<bool> {
        self.drain_driver_trace(MAX_TRACE_ENTRIES);
        let now = self.now();
        match self.trace.as_deref() {
            Some(t) => t.rec.write_json(now, w).map(|()| true),
            None => Ok(false),
        }
    }

    /// A control entry the device takes (`seq` = its index), if tracing.
    pub(super) fn trace_ctl(&mut self, seq: u32, e: &faultline_abi::CtlEntry) {
        self.trace_event(Event::CtlStart {
            seq,
            op: e.op,
            context: e.context,
            start: e.start,
            len: e.len,
        });
    }

    /// Record `ev` now, if tracing.
    #[inline]
    pub(super) fn trace_event(&mut self, ev: Event) {
        if let Some(t) = self.trace.as_deref_mut() {
            t.rec.push(self.clock.now(), ev);
        }
    }

    pub(super) fn trace_reg_read(&self, offset: u64) -> u32 {
        let Some(t) = self.trace.as_deref() else {
            return 0;
        };
        match offset {
            regs::TRACE_CAP => MAX_TRACE_ENTRIES,
            regs::TRACE_RING_LO => t.ring_addr as u32,
            regs::TRACE_RING_HI => (t.ring_addr >> 32) as u32,
            regs::TRACE_RING_ENTRIES => t.ring.map_or(0, |r| r.1),
            _ => 0,
        }
    }

    pub(super) fn trace_reg_write(&mut self, offset: u64, v: u32) {
        let now = self.now();
        let Some(t) = self.trace.as_deref_mut() else {
            return;
        };
        match offset {
            regs::TRACE_RING_LO => set_lo(&mut t.ring_addr, v),
            regs::TRACE_RING_HI => set_hi(&mut t.ring_addr, v),
            regs::TRACE_RING_ENTRIES => {
                let base = t.ring_addr;
                let ok = v.is_power_of_two()
                    && (2..=MAX_TRACE_ENTRIES).contains(&v)
                    && base.is_multiple_of(PAGE_SIZE)
                    && self.range_in_ram(base, ring::ring_bytes(v));
                // Whatever the driver's old ring held is read first.
                self.drain_driver_trace(MAX_TRACE_ENTRIES);
                if let Some(t) = self.trace.as_deref_mut() {
                    t.ring = ok.then_some((base, v, 0));
                }
            }
            regs::TRACE_SYNC => t.rec.sync_sample(now),
            regs::TRACE_TSC_LO => t.tsc_lo = v,
            regs::TRACE_TSC_HI => t.rec.sync_guest(u64::from(t.tsc_lo) | (u64::from(v) << 32)),
            _ => {}
        }
    }

    /// Read at most `limit` entries of the driver's trace ring into the
    /// trace. A ring that became unreadable is unregistered; indices that
    /// ran ahead of the ring skip to the newest `entries` (counted).
    pub(super) fn drain_driver_trace(&mut self, limit: u32) {
        let Some((base, entries, cons)) = self.trace.as_deref().and_then(|t| t.ring) else {
            return;
        };
        let load = |off: usize| {
            self.mem
                .load::<u32>(GuestAddress(base + off as u64), Ordering::Acquire)
                .map(u32::from_le)
        };
        let (Ok(prod), Ok(dropped)) = (
            load(TraceHeader::PROD_OFFSET),
            load(TraceHeader::DROPPED_OFFSET),
        ) else {
            self.unregister_driver_trace();
            return;
        };
        if prod == cons {
            if let Some(t) = self.trace.as_deref_mut() {
                t.rec.guest_dropped = dropped;
            }
            return;
        }
        let mut cons = cons;
        let mut skipped = 0;
        if prod.wrapping_sub(cons) > entries {
            let new = prod.wrapping_sub(entries);
            skipped = u64::from(new.wrapping_sub(cons));
            cons = new;
        }
        let mut read = Vec::new();
        while cons != prod && (read.len() as u32) < limit {
            let mut b = [0u8; TraceEntry::SIZE];
            let at = base + ring::entry_offset(cons % entries);
            if self.mem.read_slice(&mut b, GuestAddress(at)).is_err() {
                self.unregister_driver_trace();
                return;
            }
            read.push(TraceEntry::from_le_bytes(&b));
            cons = cons.wrapping_add(1);
        }
        let stored = self.mem.store(
            cons.to_le(),
            GuestAddress(base + TraceHeader::CONS_OFFSET as u64),
            Ordering::Release,
        );
        let Some(t) = self.trace.as_deref_mut() else {
            return;
        };
        t.rec.guest_dropped = dropped;
        t.rec.guest_skipped += skipped;
        for e in read {
            let ev = Event::Driver {
                kind: e.kind,
                context: e.context,
                a: e.a,
                b: e.b,
            };
            t.rec.push(e.tsc, ev);
        }
        t.ring = stored.is_ok().then_some((base, entries, cons));
    }

    /// RESET: the driver's ring is read one last time and unregistered.
    pub(super) fn reset_trace_ring(&mut self) {
        self.drain_driver_trace(MAX_TRACE_ENTRIES);
        if let Some(t) = self.trace.as_deref_mut() {
            t.ring_addr = 0;
        }
        self.unregister_driver_trace();
    }

    fn unregister_driver_trace(&mut self) {
        if let Some(t) = self.trace.as_deref_mut() {
            t.ring = None;
        }
    }
}
