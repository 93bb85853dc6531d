//! The driver's own counters: what the bottom half and the SVM layer did.

use core::sync::atomic::{AtomicU64, Ordering};

use super::stats::LatencyStats;

/// Declares the counters once: [`DriverCounters`] (atomics, plus the
/// latency cells), [`CounterSnapshot`] (plain copies) and the name list
/// the stats line and `Display` use, in this order.
macro_rules! driver_counters {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// Driver-side counters (`Gpu::counters`).
        #[derive(Debug, Default)]
        pub struct DriverCounters {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
            /// Per-size latencies (`gpu::stats`; read them with `Gpu::stats`).
            pub latency: LatencyStats,
        }

        /// A plain copy of [`DriverCounters`].
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct CounterSnapshot {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl DriverCounters {
            /// Reads all counters.
            pub fn snapshot(&self) -> CounterSnapshot {
                CounterSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }

        impl CounterSnapshot {
            /// Every counter with its name (the field's).
            pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> {
                [$((stringify!($name), self.$name),)*].into_iter()
            }
        }
    };
}

driver_counters! {
    /// Fault entries read from the buffer.
    faults_read,
    /// Entries dropped as duplicates of another (same context and page).
    faults_deduplicated,
    /// Faults handed to fault handlers (after deduplication within a batch).
    faults_serviced,
    /// Entries discarded by a fault-buffer flush (`batch_flush`).
    faults_flushed,
    /// Fault batches (drains of up to the policy's batch size that found
    /// entries).
    batches,
    /// Windows serviced (SVM).
    windows,
    /// Device leaves written by fault servicing (SVM).
    pages_mapped,
    /// Window passes retried because the range was invalidated (SVM).
    retries,
    /// REPLAY doorbells rung.
    replays,
    /// Faults cancelled.
    cancels,
    /// Invalidations received from the CPU side (SVM sync callbacks).
    invalidations,
    /// Of those, `MmuNotifyEvent::Unmap` (munmap, the old range of an
    /// mremap, exit).
    invalidations_unmap,
    /// Of those, `Clear` (madvise(DONTNEED), reclaim, zero-page COW).
    invalidations_clear,
    /// Of those, `ProtectionVma` (an mprotect that may take read away).
    invalidations_protect_vma,
    /// Of those, `ProtectionPage` (an mprotect to read-only).
    invalidations_protect_page,
    /// Of those, `Migrate` (any device's or the mm's migration).
    invalidations_migrate,
    /// 4 KiB pages mapped with ATOMIC because the context holds them
    /// device-exclusive (`SvmConfig::exclusive_atomics`).
    exclusive_grants,
    /// Of the invalidations, `Exclusive` with no owner: a CPU access took a page back
    /// from a device's exclusive hold (the device's atomics mapping is
    /// revoked).
    exclusive_revocations,
    /// TLB invalidations the driver submitted and saw acknowledged.
    tlb_invalidates,
    /// 4 KiB pages migrated from system memory to VRAM (device memory).
    pages_to_vram,
    /// Of `pages_to_vram`, those a GPU fault migrated
    /// (`MigratePolicy::FirstTouch`).
    pages_to_vram_by_fault,
    /// 4 KiB pages migrated from VRAM back to system memory by an explicit
    /// migration (`DeviceMemory::migrate_to_system`).
    pages_to_system,
    /// 4 KiB pages a CPU fault on a device-private entry brought back
    /// (`migrate_to_ram`).
    pages_cpu_faulted_back,
    /// 4 KiB pages eviction migrated from VRAM back to system memory to
    /// make room for a migration to VRAM.
    pages_evicted,
    /// VRAM chunks eviction took pages from.
    chunks_evicted,
}

impl DriverCounters {
    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

impl core::fmt::Display for CounterSnapshot {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut sep = "";
        for (name, v) in self.iter() {
            write!(f, "{sep}{name} {v}")?;
            sep = " ";
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_every_counter_once_in_order() {
        let c = DriverCounters::default();
        DriverCounters::add(&c.faults_read, 1);
        DriverCounters::add(&c.chunks_evicted, 7);
        let s = c.snapshot();
        let text = alloc::format!("{s}");
        assert!(
            text.starts_with("faults_read 1 faults_deduplicated 0 "),
            "{text}"
        );
        assert!(text.ends_with(" chunks_evicted 7"), "{text}");
        assert_eq!(text.split(' ').count(), 2 * s.iter().count());
        assert_eq!(s.iter().count(), 25);
    }
}
