//! Test-only driver mutants (cargo feature `mutants`): five classic SVM
//! driver bugs, each switched on at run time at the one place a real driver
//! once got wrong, so the suite's tests (`gpu::suite::mutants`) can show
//! they catch it with the device's coherence checker (`--gpu-check=fatal`).
//!
//! None of this exists in the default build: every hook in the driver is
//! `#[cfg(feature = "mutants")]`, and `scripts/test.sh lint` checks that the
//! default firmware and driver builds do not enable the feature.
//!
//! At most one mutant is active at a time, set by the host (the firmware's
//! `mutant=` command-line word, a loopback test) before the driver runs.

use core::sync::atomic::{AtomicU8, Ordering};

use faultline_abi::NUM_CONTEXTS;

use super::{Context, Platform};
use crate::sync::SpinMutex;

/// A deliberately broken driver behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mutant {
    /// (a) The TLB invalidate is posted but its acknowledgement not awaited:
    /// the mm goes on to change the CPU PTEs and free frames while the
    /// device still uses the old translations.
    NoAckWait = 1,
    /// (b) The fault path ignores `range_check_seq` (before HMM's 2019
    /// `valid` flag, drivers did): pfns an invalidation made stale between
    /// `range_fault` and the page-table lock are mapped anyway.
    NoSeqCheck = 2,
    /// (c) The whole fault-around window is mapped with the strongest access
    /// any of its faults asked for, whatever each page's pfn allows.
    StrongestAccess = 3,
    /// (d) A write-protection (mprotect read-only) downgrades the device
    /// leaves but skips the TLB invalidate: cached writable translations
    /// survive.
    MprotectNoFlush = 4,
    /// (e) The device PTEs of a range are cleared only after the mm freed its
    /// frames: the invalidation is deferred to the next fault service.
    UnmapAfterFree = 5,
}

impl Mutant {
    /// Every mutant, in letter order (a..e).
    pub const ALL: [Mutant; 5] = [
        Mutant::NoAckWait,
        Mutant::NoSeqCheck,
        Mutant::StrongestAccess,
        Mutant::MprotectNoFlush,
        Mutant::UnmapAfterFree,
    ];

    /// Its name on a command line.
    pub fn name(self) -> &'static str {
        match self {
            Mutant::NoAckWait => "no_ack_wait",
            Mutant::NoSeqCheck => "no_seq_check",
            Mutant::StrongestAccess => "strongest_access",
            Mutant::MprotectNoFlush => "mprotect_no_flush",
            Mutant::UnmapAfterFree => "unmap_after_free",
        }
    }

    /// The suite test (`gpu::suite`) that catches it.
    pub fn test(self) -> &'static str {
        match self {
            Mutant::NoAckWait => "munmap_during_stream",
            Mutant::NoSeqCheck => "munmap_between_fault_and_map",
            Mutant::StrongestAccess => "window_access_per_page",
            Mutant::MprotectNoFlush => "mprotect_during_stream",
            Mutant::UnmapAfterFree => "munmap_frees_after_clear",
        }
    }

    /// Its letter (a..e).
    pub fn letter(self) -> char {
        (b'a' + self as u8 - 1) as char
    }

    /// A mutant by letter or name.
    pub fn parse(s: &str) -> Option<Mutant> {
        Mutant::ALL
            .into_iter()
            .find(|m| s == m.name() || s.len() == 1 && s.starts_with(m.letter()))
    }
}

static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// Switches mutant `m` on (`None`: the real driver). Also forgets work a
/// previous mutant deferred.
pub fn set(m: Option<Mutant>) {
    ACTIVE.store(m.map_or(0, |m| m as u8), Ordering::Release);
    *DEFERRED.lock() = [None; NUM_CONTEXTS as usize];
}

/// Whether `m` is the active mutant.
pub fn active(m: Mutant) -> bool {
    ACTIVE.load(Ordering::Acquire) == m as u8
}

/// Ranges whose device-PTE clearing `UnmapAfterFree` put off, per context:
/// one covering range each, so the memory stays bounded.
static DEFERRED: SpinMutex<[Option<(u64, u64)>; NUM_CONTEXTS as usize]> =
    SpinMutex::new([None; NUM_CONTEXTS as usize]);

/// `UnmapAfterFree`: remembers `[start, end)` of context `ctx` instead of
/// clearing it now.
pub(crate) fn defer(ctx: u32, start: u64, end: u64) {
    let mut d = DEFERRED.lock();
    let Some(slot) = d.get_mut(ctx as usize) else {
        return;
    };
    *slot = Some(match *slot {
        Some((s, e)) => (s.min(start), e.max(end)),
        None => (start, end),
    });
}

/// `UnmapAfterFree`: does the clearing (and TLB invalidate) deferred for
/// `ctx`, late: by now the mm has freed the range's frames.
pub(crate) fn clear_deferred<P: Platform>(ctx: &Context<P>) {
    let Some((start, end)) = DEFERRED
        .lock()
        .get_mut(ctx.index() as usize)
        .and_then(Option::take)
    else {
        return;
    };
    let cleared = ctx.page_table().unmap_range(start, end);
    if cleared.leaves > 0 {
        if let Err(e) = ctx.invalidate(cleared.start, cleared.end - cleared.start) {
            log::error!("mutant: deferred invalidate of {start:#x}..{end:#x}: {e}");
        }
    }
}
