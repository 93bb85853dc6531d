//! The doorbell half of the benchmarks' latency stamps.

use core::ops::Range;
use core::sync::atomic::{AtomicU64, Ordering};

use faultline_abi::doorbell;
use faultline_driver::gpu::{DmaRegion, Platform};

use crate::arch::time;
use crate::gpu::FwPlatform;

/// BAR0 offsets of the doorbells.
const DOORBELLS: Range<u64> = doorbell::offset(0)..doorbell::offset(doorbell::COUNT);
/// The TSC just before the latest doorbell write.
static DOORBELL_TSC: AtomicU64 = AtomicU64::new(0);

pub fn last_doorbell_tsc() -> u64 {
    DOORBELL_TSC.load(Ordering::Relaxed)
}

/// The firmware's platform, stamping the TSC just before every doorbell
/// write: the start of the doorbell-to-interrupt latencies.
#[derive(Debug, Clone)]
pub struct Stamped(pub FwPlatform);

impl Platform for Stamped {
    fn read32(&self, offset: u64) -> u32 {
        self.0.read32(offset)
    }

    fn write32(&self, offset: u64, value: u32) {
        if DOORBELLS.contains(&offset) {
            DOORBELL_TSC.store(time::rdtsc(), Ordering::Relaxed);
        }
        self.0.write32(offset, value)
    }

    fn dma_alloc(&self, pages: usize) -> Option<DmaRegion> {
        self.0.dma_alloc(pages)
    }

    fn dma_free(&self, region: DmaRegion) {
        self.0.dma_free(region)
    }

    fn take_interrupts(&self) -> u32 {
        self.0.take_interrupts()
    }

    fn wait_interrupt(&self, timeout_ns: u64) {
        self.0.wait_interrupt(timeout_ns)
    }

    fn now_ns(&self) -> u64 {
        self.0.now_ns()
    }

    fn stats_ticks(&self) -> u64 {
        self.0.stats_ticks()
    }

    fn stats_ticks_to_ns(&self, ticks: u64) -> u64 {
        self.0.stats_ticks_to_ns(ticks)
    }

    fn trace_tsc(&self) -> Option<u64> {
        self.0.trace_tsc()
    }
}
