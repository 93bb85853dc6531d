//! HMM: a device driver's mirror of a process address space (Linux HMM as of
//! mid-2019, with two rules of its own: `range_register` takes the mirror,
//! whose `Hmm` the range shares, and a registered range holds an mm *users*
//! reference for its lifetime, so release cannot run while a range exists).
//!
//! Driver pattern (docs/hmm.md has the full contract):
//!
//! ```text
//! mirror = mirror_register(mm, &mmap_write_lock(mm), ops)
//! range_register(&mut range, &mirror, start, end, PAGE_SHIFT)
//! loop {
//!     { let mmap = mmap_read_lock(mm); range_fault(&mut range, &mmap, true)? }
//!     lock driver update lock
//!     if !range_check_seq(&range) { unlock; continue }   // invalidated: retry
//!     write device PTEs from range.pfns; unlock; break
//! }
//! range_unregister(&mut range)
//! ```
//!
//! Improvement over 2019: `range_valid()` (the 2019 `range->valid` flag) turns
//! true again as soon as all invalidations have ended, so an invalidation that
//! starts *and* ends between `range_fault` and the driver's check is invisible
//! to it. Every invalidation therefore also stamps the ranges it overlaps with
//! a fresh value of a per-address-space sequence; `range_fault` /
//! `range_snapshot` remember the stamp they started from and
//! [`range_check_seq`] compares it under the driver's update lock
//! (the `mmu_interval_read_begin` / `mmu_interval_read_retry` idea of 5.5).
//!
//! The pieces: [`Hmm`], the per-address-space state and its side of the
//! notifier chain (`notifier.rs`); mirrors (`mirror.rs`); ranges and their
//! validity checks (`range.rs`); the page-table walk of `range_snapshot` /
//! `range_fault` (`walk.rs`).

use crate::errno::Errno;
use crate::mm::{Mm, MmuNotifyEvent};

mod mirror;
mod notifier;
mod range;
mod walk;

pub use mirror::{mirror_register, mirror_unregister, HmmMirror};
pub use notifier::Hmm;
pub use range::{
    range_check_seq, range_register, range_unregister, range_valid, range_wait_until_valid,
    HmmRange,
};
pub use walk::{range_fault, range_snapshot};

/// Indices into [`HmmRange::flags`] (`enum hmm_pfn_flag_e`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum HmmPfnFlag {
    /// The entry is a valid translation (request: the page must be present).
    Valid = 0,
    /// The translation allows writes (request: the page must be writable).
    Write = 1,
    /// Device-private memory of the range's own device
    /// ([`HmmRange::dev_private_owner`]): the entry's pfn is the page's frame
    /// in that device's memory, not a system frame. Output only.
    DevicePrivate = 2,
}

/// Number of entries in [`HmmRange::flags`].
pub const HMM_PFN_FLAG_MAX: usize = 3;

/// Indices into [`HmmRange::values`] (`enum hmm_pfn_value_e`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum HmmPfnValue {
    /// Faulting this entry failed.
    Error = 0,
    /// No translation (or not filled because of an earlier error).
    None = 1,
    /// A special mapping the device must not use.
    Special = 2,
}

/// Number of entries in [`HmmRange::values`].
pub const HMM_PFN_VALUE_MAX: usize = 3;

/// What a mirror is told when the CPU page tables change (`struct hmm_update`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HmmUpdate {
    /// First byte of the invalidated range.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Why (5.3 only had `HMM_UPDATE_INVALIDATE`). The notifier event is
    /// passed through because on `ProtectionPage` a driver may downgrade its
    /// translations to read-only instead of clearing them; every other event
    /// needs them cleared.
    pub event: MmuNotifyEvent,
    /// Whether the callback may block (wait for the update lock or the device's
    /// TLB-invalidate acknowledgement).
    pub blockable: bool,
}

/// The driver's side of a mirror (`struct hmm_mirror_ops`).
///
/// Re-entrancy (as in Linux): `sync_cpu_device_pagetables` runs with
/// `mirrors_sem` held for read, so it must not register or unregister a
/// mirror of the same address space, nor drop a range that may hold the last
/// mm users reference (release would need `mirrors_sem` for write).
pub trait HmmMirrorOps<M: Mm>: Send + Sync {
    /// Remove every device translation in `[update.start, update.end)` (or,
    /// on `ProtectionPage`, make it read-only) and wait until the device no
    /// longer uses the old ones. Take the driver's update lock: that is what orders this against
    /// `range_check_seq`. If `!update.blockable` and this would have to block,
    /// return `Err(Errno::EAGAIN)` without blocking. Errors on a blockable
    /// update are logged and ignored (as in Linux).
    fn sync_cpu_device_pagetables(&self, update: &HmmUpdate) -> Result<(), Errno>;

    /// The address space is going away (last `mmput`): stop using it. After
    /// this no more `sync_cpu_device_pagetables` calls arrive for this mirror.
    fn release(&self) {}
}

#[cfg(test)]
mod tests;
