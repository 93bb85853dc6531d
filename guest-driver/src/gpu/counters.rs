//! The driver's own counters: what the bottom half and the SVM layer did.

use core::sync::atomic::{AtomicU64, Ordering};

use super::stats::LatencyStats;

/// Driver-side counters (`Gpu::counters`).
#[derive(Debug, Default)]
pub struct DriverCounters {
    /// Fault entries read from the buffer.
    pub faults_read: AtomicU64,
    /// Entries dropped as duplicates of another (same context and page).
    pub faults_deduplicated: AtomicU64,
    /// Windows serviced (SVM).
    pub windows: AtomicU64,
    /// Device leaves written by fault servicing (SVM).
    pub pages_mapped: AtomicU64,
    /// Window passes retried because the range was invalidated (SVM).
    pub retries: AtomicU64,
    /// REPLAY doorbells rung.
    pub replays: AtomicU64,
    /// Faults cancelled.
    pub cancels: AtomicU64,
    /// Invalidations received from the CPU side (SVM sync callbacks).
    pub invalidations: AtomicU64,
    /// TLB invalidations the driver submitted and saw acknowledged.
    pub tlb_invalidates: AtomicU64,
    /// Fault batches (drains of up to the policy's batch size that found
    /// entries).
    pub batches: AtomicU64,
    /// Faults handed to fault handlers (after deduplication within a batch).
    pub faults_serviced: AtomicU64,
    /// Entries discarded by a fault-buffer flush (`batch_flush`).
    pub faults_flushed: AtomicU64,
    /// Per-size latencies (`gpu::stats`; read them with `Gpu::stats`).
    pub latency: LatencyStats,
}

/// A plain copy of [`DriverCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// See [`DriverCounters`].
    pub faults_read: u64,
    /// See [`DriverCounters`].
    pub faults_deduplicated: u64,
    /// See [`DriverCounters`].
    pub windows: u64,
    /// See [`DriverCounters`].
    pub pages_mapped: u64,
    /// See [`DriverCounters`].
    pub retries: u64,
    /// See [`DriverCounters`].
    pub replays: u64,
    /// See [`DriverCounters`].
    pub cancels: u64,
    /// See [`DriverCounters`].
    pub invalidations: u64,
    /// See [`DriverCounters`].
    pub tlb_invalidates: u64,
    /// See [`DriverCounters`].
    pub batches: u64,
    /// See [`DriverCounters`].
    pub faults_serviced: u64,
    /// See [`DriverCounters`].
    pub faults_flushed: u64,
}

impl DriverCounters {
    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads all counters.
    pub fn snapshot(&self) -> CounterSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            faults_read: r(&self.faults_read),
            faults_deduplicated: r(&self.faults_deduplicated),
            windows: r(&self.windows),
            pages_mapped: r(&self.pages_mapped),
            retries: r(&self.retries),
            replays: r(&self.replays),
            cancels: r(&self.cancels),
            invalidations: r(&self.invalidations),
            tlb_invalidates: r(&self.tlb_invalidates),
            batches: r(&self.batches),
            faults_serviced: r(&self.faults_serviced),
            faults_flushed: r(&self.faults_flushed),
        }
    }
}

impl CounterSnapshot {
    /// Every counter with its name (the field's).
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> {
        [
            ("faults_read", self.faults_read),
            ("faults_deduplicated", self.faults_deduplicated),
            ("faults_serviced", self.faults_serviced),
            ("faults_flushed", self.faults_flushed),
            ("batches", self.batches),
            ("windows", self.windows),
            ("pages_mapped", self.pages_mapped),
            ("retries", self.retries),
            ("replays", self.replays),
            ("cancels", self.cancels),
            ("invalidations", self.invalidations),
            ("tlb_invalidates", self.tlb_invalidates),
        ]
        .into_iter()
    }
}

impl core::fmt::Display for CounterSnapshot {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "faults read {} dedup {} serviced {} flushed {} batches {} windows {} \
             pages mapped {} retries {} replays {} cancels {} invalidations {} \
             tlb invalidates {}",
            self.faults_read,
            self.faults_deduplicated,
            self.faults_serviced,
            self.faults_flushed,
            self.batches,
            self.windows,
            self.pages_mapped,
            self.retries,
            self.replays,
            self.cancels,
            self.invalidations,
            self.tlb_invalidates
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_every_counter() {
        let s = CounterSnapshot {
            faults_read: 1,
            faults_deduplicated: 2,
            windows: 3,
            pages_mapped: 4,
            retries: 5,
            replays: 6,
            cancels: 7,
            invalidations: 8,
            tlb_invalidates: 9,
            batches: 10,
            faults_serviced: 11,
            faults_flushed: 12,
        };
        assert_eq!(
            alloc::format!("{s}"),
            "faults read 1 dedup 2 serviced 11 flushed 12 batches 10 windows 3 \
             pages mapped 4 retries 5 replays 6 cancels 7 invalidations 8 \
             tlb invalidates 9"
        );
    }
}
