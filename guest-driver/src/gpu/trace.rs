//! The driver's side of the fault timeline: events written into the trace
//! ring the device reads into the host's trace (docs/gpu-abi.md "Trace
//! ring"). Set up at probe only when the device says the host traces
//! (`TRACE_CAP` non-zero) and the platform has a TSC; otherwise
//! `Gpu::trace` is one branch on `None`.

use core::sync::atomic::{fence, Ordering};

use faultline_abi::{regs, trace as ring, TraceEntry, TraceHeader, TraceKind, PAGE_SIZE};

use super::platform::{DmaRegion, Platform};
use crate::sync::SpinMutex;

/// Entries the driver's ring holds at most: the device reads 256 per
/// step, and a full ring drops (and counts) rather than waits.
const RING_ENTRIES: u32 = 1024;

pub(crate) struct DriverTrace {
    ring: DmaRegion,
    entries: u32,
    /// (prod, dropped), as last published in the header.
    state: SpinMutex<(u32, u32)>,
}

impl DriverTrace {
    /// Registers a ring and pairs the clocks, if the host traces.
    pub(crate) fn setup<P: Platform>(p: &P) -> Option<Self> {
        let cap = p.read32(regs::TRACE_CAP);
        let entries = RING_ENTRIES.min(cap);
        if entries < 2 || !entries.is_power_of_two() {
            return None;
        }
        // The host asked for a trace: say why there will be no driver side.
        if p.trace_tsc().is_none() {
            log::warn!("gpu: no driver trace ring: this platform has no trace clock");
            return None;
        }
        let bytes = ring::ring_bytes(entries);
        let Some(region) = p.dma_alloc(bytes.div_ceil(PAGE_SIZE) as usize) else {
            log::warn!("gpu: no driver trace ring: {bytes} bytes of DMA memory not available");
            return None;
        };
        p.write32(regs::TRACE_RING_LO, region.phys() as u32);
        p.write32(regs::TRACE_RING_HI, (region.phys() >> 32) as u32);
        p.write32(regs::TRACE_RING_ENTRIES, entries);
        if p.read32(regs::TRACE_RING_ENTRIES) != entries {
            log::warn!("gpu: no driver trace ring: the device refused {entries} entries");
            p.dma_free(region);
            return None;
        }
        // The device samples its clock while it handles this write, which
        // lies between t1 and t2.
        let t1 = p.trace_tsc().unwrap_or(0);
        p.write32(regs::TRACE_SYNC, 1);
        let t2 = p.trace_tsc().unwrap_or(t1);
        let mid = t1.wrapping_add(t2.wrapping_sub(t1) / 2);
        p.write32(regs::TRACE_TSC_LO, mid as u32);
        p.write32(regs::TRACE_TSC_HI, (mid >> 32) as u32);
        Some(Self {
            ring: region,
            entries,
            state: SpinMutex::new((0, 0)),
        })
    }

    /// Write one event (dropped and counted when the ring is full).
    pub(crate) fn push(&self, tsc: u64, kind: TraceKind, context: u32, a: u64, b: u64) {
        let mut st = self.state.lock();
        let (prod, dropped) = &mut *st;
        let cons = self.ring.read_u32(TraceHeader::CONS_OFFSET);
        fence(Ordering::Acquire);
        if prod.wrapping_sub(cons) >= self.entries {
            *dropped = dropped.wrapping_add(1);
            self.ring.write_u32(TraceHeader::DROPPED_OFFSET, *dropped);
            return;
        }
        let e = TraceEntry {
            tsc,
            kind: kind as u32,
            context,
            a,
            b,
        };
        let at = ring::entry_offset(*prod % self.entries) as usize;
        for (i, w) in e.to_le_bytes().chunks_exact(8).enumerate() {
            let mut v = [0u8; 8];
            v.copy_from_slice(w);
            self.ring.write_u64(at + 8 * i, u64::from_le_bytes(v));
        }
        *prod = prod.wrapping_add(1);
        fence(Ordering::Release);
        self.ring.write_u32(TraceHeader::PROD_OFFSET, *prod);
    }

    /// The ring, for the platform to free once the device was reset.
    pub(crate) fn into_region(self) -> DmaRegion {
        self.ring
    }
}
