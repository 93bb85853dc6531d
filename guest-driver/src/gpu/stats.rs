//! Per-size latency statistics of the fault pipeline (count, total and
//! maximum time) and the machine-readable line the suite prints per test.
//!
//! Sizes are classes, each holding everything up to its size: `4k` (a
//! window or range of at most 4 KiB), `64k` (more than 4 KiB, at most
//! 64 KiB), `2m` (more than 64 KiB, at most 2 MiB), `other` (larger, and
//! whole-context TLB invalidations). A window is classed by its size after
//! clipping to its VMA (what it asked the mm and the device page table
//! for), whatever leaves that took; a TLB invalidation by the length it
//! invalidated. Replays have no size.
//!
//! What each operation times, from one [`Platform::stats_ticks`] read at
//! each end (none per page; none while the fault buffer is empty), the
//! ticks turned into ns only when the statistics are read:
//! * `window`: a window whose device leaves were written, from the start
//!   of its first `range_fault` to the release of the update lock after
//!   writing them (retries included).
//! * `range_fault`: every `range_fault` call (one per pass of a window).
//! * `pte_write`: the update-lock section that wrote a window's leaves
//!   (taking the lock, the sequence check, the writes).
//! * `tlb_invalidate`: submit of the control entry → its acknowledgement
//!   seen.
//! * `fault_migrate`: a window's migration to VRAM before it is serviced
//!   (`MigratePolicy::FirstTouch`; eviction included), whatever it moved.
//! * `replay`: the drain of the batch a REPLAY retries → the REPLAY
//!   doorbell written (`block`: per fault; `once`: from the first batch
//!   owed).
//!
//! [`Platform::stats_ticks`]: super::Platform::stats_ticks

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use super::counters::CounterSnapshot;

/// What is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A window serviced: first `range_fault` → leaves written.
    Window,
    /// One `range_fault` call.
    RangeFault,
    /// The update-lock section that writes a window's device leaves.
    PteWrite,
    /// A TLB invalidation: submit → acknowledgement.
    TlbInvalidate,
    /// A window's first-touch migration to VRAM.
    FaultMigrate,
}

/// A size class (module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeClass {
    /// At most 4 KiB.
    K4,
    /// More than 4 KiB, at most 64 KiB.
    K64,
    /// More than 64 KiB, at most 2 MiB.
    M2,
    /// More than 2 MiB (and whole-context invalidations).
    Other,
}

impl SizeClass {
    /// The class of `bytes`.
    pub fn of(bytes: u64) -> Self {
        match bytes {
            0..=0x1000 => SizeClass::K4,
            0x1001..=0x1_0000 => SizeClass::K64,
            0x1_0001..=0x20_0000 => SizeClass::M2,
            _ => SizeClass::Other,
        }
    }
}

const OPS: usize = 5;
const CLASSES: usize = 4;

/// The names [`LatencySnapshot::iter`] gives, `<op>.<class>`.
const NAMES: [[&str; CLASSES]; OPS] = [
    ["window.4k", "window.64k", "window.2m", "window.other"],
    [
        "range_fault.4k",
        "range_fault.64k",
        "range_fault.2m",
        "range_fault.other",
    ],
    [
        "pte_write.4k",
        "pte_write.64k",
        "pte_write.2m",
        "pte_write.other",
    ],
    [
        "tlb_invalidate.4k",
        "tlb_invalidate.64k",
        "tlb_invalidate.2m",
        "tlb_invalidate.other",
    ],
    [
        "fault_migrate.4k",
        "fault_migrate.64k",
        "fault_migrate.2m",
        "fault_migrate.other",
    ],
];

/// One cell, in `Platform::stats_ticks` ticks.
#[derive(Debug, Default)]
struct Cell {
    count: AtomicU64,
    total: AtomicU64,
    max: AtomicU64,
}

impl Cell {
    fn record(&self, ticks: u64) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(ticks, Ordering::Relaxed);
        // A new maximum is rare: the plain load keeps the locked
        // compare-exchange loop (emulated guest instructions) out of the
        // common case.
        if ticks > self.max.load(Ordering::Relaxed) {
            self.max.fetch_max(ticks, Ordering::Relaxed);
        }
    }

    fn get(&self, to_ns: &impl Fn(u64) -> u64) -> Latency {
        Latency {
            count: self.count.load(Ordering::Relaxed),
            total_ns: to_ns(self.total.load(Ordering::Relaxed)),
            max_ns: to_ns(self.max.load(Ordering::Relaxed)),
        }
    }
}

/// The driver's latency statistics (`Gpu::counters().latency`).
#[derive(Debug, Default)]
pub struct LatencyStats {
    cells: [[Cell; CLASSES]; OPS],
    replay: Cell,
}

impl LatencyStats {
    /// Records one `op` over `bytes` that took `from → to` ticks (a clock
    /// that went backwards counts 0).
    pub(crate) fn record(&self, op: Op, bytes: u64, from: u64, to: u64) {
        self.cells[op as usize][SizeClass::of(bytes) as usize].record(to.saturating_sub(from));
    }

    /// Records one REPLAY, `from` the drain of what it retries `to` its
    /// doorbell (ticks).
    pub(crate) fn record_replay(&self, from: u64, to: u64) {
        self.replay.record(to.saturating_sub(from));
    }

    /// Reads every cell; `to_ns` converts ticks (`Platform::stats_ticks_to_ns`).
    pub fn snapshot(&self, to_ns: impl Fn(u64) -> u64) -> LatencySnapshot {
        let mut s = LatencySnapshot::default();
        for (o, row) in self.cells.iter().enumerate() {
            for (c, cell) in row.iter().enumerate() {
                s.cells[o][c] = cell.get(&to_ns);
            }
        }
        s.replay = self.replay.get(&to_ns);
        s
    }
}

/// One cell: how many, their total and the longest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    /// Operations recorded.
    pub count: u64,
    /// Their total time (ns).
    pub total_ns: u64,
    /// The longest (ns).
    pub max_ns: u64,
}

impl Latency {
    /// Total, in whole µs.
    pub fn total_us(&self) -> u64 {
        self.total_ns / 1000
    }

    /// Longest, in whole µs.
    pub fn max_us(&self) -> u64 {
        self.max_ns / 1000
    }
}

/// A plain copy of [`LatencyStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencySnapshot {
    cells: [[Latency; CLASSES]; OPS],
    replay: Latency,
}

impl LatencySnapshot {
    /// The cell of `op` at `class`.
    pub fn get(&self, op: Op, class: SizeClass) -> Latency {
        self.cells[op as usize][class as usize]
    }

    /// The replays.
    pub fn replay(&self) -> Latency {
        self.replay
    }

    /// Every cell with its name (`window.64k`, ..., `replay`), zero ones
    /// included.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, Latency)> + '_ {
        NAMES
            .iter()
            .zip(&self.cells)
            .flat_map(|(n, row)| n.iter().copied().zip(row.iter().copied()))
            .chain(core::iter::once(("replay", self.replay)))
    }
}

impl fmt::Display for LatencySnapshot {
    /// The cells that counted something, space-separated as
    /// `<name>=<count>/<total µs>/<max µs>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        for (name, l) in self.iter().filter(|(_, l)| l.count > 0) {
            write!(f, "{sep}{name}={}/{}/{}", l.count, l.total_us(), l.max_us())?;
            sep = " ";
        }
        Ok(())
    }
}

/// The counters and latencies of a driver as one machine-readable line
/// body: the non-zero counters as `<name>=<value>`, then the non-zero
/// latency cells as [`LatencySnapshot`] prints them, space-separated. The
/// suite prints it per test as `stats <test> policy=<policy> <this>`
/// (README "`faultline run`"), which the VMM reads back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// The counters.
    pub counters: CounterSnapshot,
    /// The latencies.
    pub latency: LatencySnapshot,
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        for (name, v) in self.counters.iter().filter(|(_, v)| *v > 0) {
            write!(f, "{sep}{name}={v}")?;
            sep = " ";
        }
        if self.latency.iter().any(|(_, l)| l.count > 0) {
            write!(f, "{sep}{}", self.latency)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    #[test]
    fn classes_hold_everything_up_to_their_size() {
        let c = |b| SizeClass::of(b);
        assert_eq!(
            [c(0), c(4096), c(4097), c(65536), c(65537), c(2 << 20)],
            [
                SizeClass::K4,
                SizeClass::K4,
                SizeClass::K64,
                SizeClass::K64,
                SizeClass::M2,
                SizeClass::M2
            ]
        );
        assert_eq!(c((2 << 20) + 1), SizeClass::Other);
        assert_eq!(c(u64::MAX), SizeClass::Other);
    }

    #[test]
    fn cells_count_sum_and_keep_the_longest() {
        let s = LatencyStats::default();
        s.record(Op::Window, 64 << 10, 1_000, 4_000);
        s.record(Op::Window, 16 << 10, 10_000, 11_500);
        s.record(Op::TlbInvalidate, 4096, 5, 3);
        s.record_replay(0, 2_500_000);
        let snap = s.snapshot(|t| t);
        assert_eq!(
            snap.get(Op::Window, SizeClass::K64),
            Latency {
                count: 2,
                total_ns: 4_500,
                max_ns: 3_000
            }
        );
        assert_eq!(snap.get(Op::TlbInvalidate, SizeClass::K4).count, 1);
        assert_eq!(snap.get(Op::TlbInvalidate, SizeClass::K4).total_ns, 0);
        assert_eq!(snap.get(Op::Window, SizeClass::K4).count, 0);
        assert_eq!(snap.iter().count(), 21);
        assert_eq!(
            format!("{snap}"),
            "window.64k=2/4/3 tlb_invalidate.4k=1/0/0 replay=1/2500/2500"
        );
    }

    #[test]
    fn the_line_has_only_what_counted() {
        let s = StatsSnapshot {
            counters: CounterSnapshot {
                faults_read: 3,
                replays: 1,
                ..CounterSnapshot::default()
            },
            latency: LatencySnapshot::default(),
        };
        assert_eq!(format!("{s}"), "faults_read=3 replays=1");
        assert_eq!(format!("{}", StatsSnapshot::default()), "");
        let l = LatencyStats::default();
        l.record(Op::RangeFault, 2 << 20, 0, 7_000);
        let s = StatsSnapshot {
            latency: l.snapshot(|t| t),
            ..s
        };
        assert_eq!(
            format!("{s}"),
            "faults_read=3 replays=1 range_fault.2m=1/7/7"
        );
    }
}
