//! Ranges (`struct hmm_range`): the part of the address space a driver
//! faults in or snapshots, registered so that invalidations can tell it
//! that its pfns went stale.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::mirror::HmmMirror;
use super::notifier::{Hmm, RangeLink};
use super::{HmmPfnFlag, HMM_PFN_FLAG_MAX, HMM_PFN_VALUE_MAX};
use crate::errno::Errno;
use crate::mm::{mmget_not_zero, mmput, DeviceOwner, Mm, PageState, PAGE_SHIFT, PMD_SHIFT};

pub(super) struct Registration<M: Mm> {
    pub(super) hmm: Arc<Hmm<M>>,
    pub(super) link: Arc<RangeLink>,
}

/// A range of the address space tracked for a device (`struct hmm_range`).
///
/// `pfns` is input and output: before `range_fault`, each entry may carry
/// request bits (`flags[Valid]`, `flags[Write]`), combined as
/// `(pfns[i] & pfn_flags_mask) | default_flags`; afterwards each entry is
/// `(pfn << pfn_shift) | flags[Valid] [| flags[Write]]` or one of `values[]`.
/// The flag bits must lie below `pfn_shift`.
pub struct HmmRange<M: Mm> {
    /// One entry per `1 << page_shift` bytes; sized by `range_register`.
    pub pfns: Vec<u64>,
    /// The driver's encoding of [`HmmPfnFlag`]s.
    pub flags: [u64; HMM_PFN_FLAG_MAX],
    /// The driver's encoding of [`HmmPfnValue`](super::HmmPfnValue)s.
    pub values: [u64; HMM_PFN_VALUE_MAX],
    /// Request bits applied to every entry.
    pub default_flags: u64,
    /// Mask applied to each entry's own request bits.
    pub pfn_flags_mask: u64,
    /// Where the pfn starts in an output entry.
    pub pfn_shift: u32,
    /// The device this range is for (Linux 5.10's `dev_private_owner`):
    /// its device-private pages are reported as such (`flags[DevicePrivate]`
    /// with the device page's frame) without a fault; another device's
    /// are faulted back to system memory when the entry asks for `Valid`,
    /// else reported as `values[None]`.
    pub dev_private_owner: Option<DeviceOwner>,
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) page_shift: u32,
    pub(super) notifier_seq: u64,
    pub(super) reg: Option<Registration<M>>,
    /// The walk's buffer of PTE-level answers, kept between walks.
    pub(super) run: Vec<PageState>,
    /// The link of the last registration, reused by the next one when
    /// nothing else holds it (a driver registers a range per fault window).
    spare_link: Option<Arc<RangeLink>>,
}

impl<M: Mm> HmmRange<M> {
    /// An unregistered range with the driver's encoding tables. Requests come
    /// from the per-entry bits (`pfn_flags_mask = !0`, `default_flags = 0`).
    pub fn new(
        flags: [u64; HMM_PFN_FLAG_MAX],
        values: [u64; HMM_PFN_VALUE_MAX],
        pfn_shift: u32,
    ) -> Self {
        HmmRange {
            pfns: Vec::new(),
            flags,
            values,
            default_flags: 0,
            pfn_flags_mask: !0,
            pfn_shift,
            dev_private_owner: None,
            start: 0,
            end: 0,
            page_shift: PAGE_SHIFT,
            notifier_seq: 0,
            reg: None,
            run: Vec::new(),
            spare_link: None,
        }
    }

    /// First byte (set by `range_register`).
    pub fn start(&self) -> u64 {
        self.start
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// log2 of the bytes one entry covers: 12 or 21.
    pub fn page_shift(&self) -> u32 {
        self.page_shift
    }

    /// Number of entries.
    pub fn npages(&self) -> usize {
        ((self.end - self.start) >> self.page_shift) as usize
    }

    /// Whether the range is registered.
    pub fn is_registered(&self) -> bool {
        self.reg.is_some()
    }

    /// The `Hmm` the range is registered with.
    pub fn hmm(&self) -> Option<&Arc<Hmm<M>>> {
        self.reg.as_ref().map(|r| &r.hmm)
    }

    /// The sequence stamp the last `range_fault`/`range_snapshot` started from.
    pub fn notifier_seq(&self) -> u64 {
        self.notifier_seq
    }

    /// `hmm_device_entry_from_pfn` plus the permission bits.
    pub fn entry_from_pfn(&self, pfn: u64, writable: bool) -> u64 {
        encode(&self.flags, self.pfn_shift, pfn, writable)
    }

    /// `hmm_device_entry_to_pfn`: the pfn of a valid output entry, `None` for
    /// the special values and entries without `flags[Valid]`.
    pub fn entry_to_pfn(&self, entry: u64) -> Option<u64> {
        if self.values.contains(&entry) || entry & self.flags[HmmPfnFlag::Valid as usize] == 0 {
            return None;
        }
        Some(entry >> self.pfn_shift)
    }

    /// Whether an output entry is a device-private page of the range's
    /// device (its pfn is then the device page's frame).
    pub fn entry_is_device_private(&self, entry: u64) -> bool {
        self.entry_to_pfn(entry).is_some()
            && entry & self.flags[HmmPfnFlag::DevicePrivate as usize] != 0
    }

    /// Whether an output entry carries `flags[Write]`.
    pub fn entry_is_writable(&self, entry: u64) -> bool {
        self.entry_to_pfn(entry).is_some() && entry & self.flags[HmmPfnFlag::Write as usize] != 0
    }
}

impl<M: Mm> Drop for HmmRange<M> {
    fn drop(&mut self) {
        range_unregister(self);
    }
}

pub(super) fn encode(
    flags: &[u64; HMM_PFN_FLAG_MAX],
    pfn_shift: u32,
    pfn: u64,
    writable: bool,
) -> u64 {
    let mut e = (pfn << pfn_shift) | flags[HmmPfnFlag::Valid as usize];
    if writable {
        e |= flags[HmmPfnFlag::Write as usize];
    }
    e
}

/// `hmm_range_register`: start tracking `[start, end)` for `mirror`.
///
/// EINVAL if `page_shift` is not 12 or 21, if start/end are not aligned to
/// it, or if `start >= end`; EBUSY if the range is already registered; EINVAL
/// if the mirror was unregistered; EFAULT if the address space is already
/// dying. On success the range holds a reference on the mirror's `Hmm` and an
/// mm users reference until `range_unregister`, so the address space cannot
/// be released meanwhile. `pfns` is resized to the number of entries
/// (existing request bits are kept).
pub fn range_register<M: Mm>(
    range: &mut HmmRange<M>,
    mirror: &HmmMirror<M>,
    start: u64,
    end: u64,
    page_shift: u32,
) -> Result<(), Errno> {
    if range.reg.is_some() {
        return Err(Errno::EBUSY);
    }
    if page_shift != PAGE_SHIFT && page_shift != PMD_SHIFT {
        return Err(Errno::EINVAL);
    }
    let mask = (1u64 << page_shift) - 1;
    if start & mask != 0 || end & mask != 0 || start >= end {
        return Err(Errno::EINVAL);
    }
    let hmm = mirror.hmm.as_ref().ok_or(Errno::EINVAL)?;
    range.start = start;
    range.end = end;
    range.page_shift = page_shift;

    // The range holds an mm users reference for its lifetime, so release
    // cannot run while it exists.
    if !mmget_not_zero(&*hmm.mm) {
        return Err(Errno::EFAULT);
    }
    range.pfns.resize(range.npages(), 0);

    let link = {
        let mut st = hmm.lock.lock();
        // If invalidations are in flight the range starts invalid and the
        // caller waits (`range_wait_until_valid`), as in 2019.
        let fresh = RangeLink {
            start,
            end,
            valid: AtomicBool::new(st.notifiers == 0),
            invalidate_seq: AtomicU64::new(st.invalidate_seq),
        };
        let link = match range.spare_link.take() {
            Some(mut l) => match Arc::get_mut(&mut l) {
                Some(slot) => {
                    *slot = fresh;
                    l
                }
                None => Arc::new(fresh),
            },
            None => Arc::new(fresh),
        };
        st.ranges.push(Arc::clone(&link));
        link
    };
    range.notifier_seq = link.invalidate_seq.load(Ordering::Acquire);
    // The range shares the mirror's `Hmm`: a plain clone, no lookup through
    // the address space (which may be dying).
    range.reg = Some(Registration {
        hmm: Arc::clone(hmm),
        link,
    });
    Ok(())
}

/// `hmm_range_unregister`: stop tracking. Unlinks the range, marks it invalid,
/// drops the mm users reference (possibly the last: then the address space is
/// released right here, calling every mirror's `release`) and the `Hmm`
/// reference. Harmless if called twice; the range may be registered again.
pub fn range_unregister<M: Mm>(range: &mut HmmRange<M>) {
    let Some(reg) = range.reg.take() else {
        return;
    };
    {
        // Order does not matter in the list: no shifting of the rest.
        let mut st = reg.hmm.lock.lock();
        if let Some(i) = st.ranges.iter().position(|r| Arc::ptr_eq(r, &reg.link)) {
            st.ranges.swap_remove(i);
        }
    }
    reg.link.valid.store(false, Ordering::Release);
    // No lock held: this may be the last mmput and run release.
    mmput(&*reg.hmm.mm);
    range.spare_link = Some(reg.link);
}

/// `hmm_range_valid`, the 2019 check: false while an overlapping invalidation
/// is in flight. **Not** sufficient on its own for the driver's final check;
/// use [`range_check_seq`].
pub fn range_valid<M: Mm>(range: &HmmRange<M>) -> bool {
    range
        .reg
        .as_ref()
        .is_some_and(|r| r.link.valid.load(Ordering::Acquire))
}

/// The race-free driver check, done under the driver's update lock (the same
/// lock its `sync_cpu_device_pagetables` takes): true iff the range is valid
/// and no invalidation overlapping it started since the last `range_fault` /
/// `range_snapshot` began. False means: drop the pfns and retry.
pub fn range_check_seq<M: Mm>(range: &HmmRange<M>) -> bool {
    let Some(reg) = range.reg.as_ref() else {
        return false;
    };
    // No hmm->lock: every invalidation stamps a new, never reused value, so
    // an unchanged stamp alone says none overlapping began since the walk's
    // `read_begin`. One that stamps after this load is ordered after the
    // check: its sync callback takes the driver's update lock, which the
    // caller holds, and clears what the caller is about to map. One that
    // stamped before is seen: it released hmm->lock after stamping and the
    // driver's update lock in its callback before the caller took it.
    reg.link.valid.load(Ordering::Acquire)
        && reg.link.invalidate_seq.load(Ordering::Acquire) == range.notifier_seq
}

/// `hmm_range_wait_until_valid`: poll until no invalidation keeps the range
/// invalid, or `timeout_ms` elapsed. Returns `range_valid()`.
pub fn range_wait_until_valid<M: Mm>(range: &HmmRange<M>, timeout_ms: u64) -> bool {
    let Some(reg) = range.reg.as_ref() else {
        return false;
    };
    let mm = &reg.hmm.mm;
    let deadline = mm
        .now_ns()
        .saturating_add(timeout_ms.saturating_mul(1_000_000));
    loop {
        if reg.link.valid.load(Ordering::Acquire) {
            return true;
        }
        if mm.now_ns() >= deadline {
            return false;
        }
        mm.cpu_relax();
    }
}
