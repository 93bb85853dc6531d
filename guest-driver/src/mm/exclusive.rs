//! Device-exclusive access (Linux's `make_device_exclusive`), generic over
//! [`Mm`]: a device that needs atomics on system memory the CPU cannot
//! share atomically takes the pages from the CPU for a while.
//!
//! [`make_device_exclusive`] faults each page of a writable private VMA in
//! writable, then replaces its PTE by a [`PageState::Exclusive`] entry that
//! keeps the frame (still counted as the process's) and names the device.
//! The next CPU access faults on that entry, and the mm's fault handler
//! calls [`exclusive_entry_restore`] before anything else.
//!
//! Ordering rules:
//! * taking a page: `invalidate_range_start` of
//!   [`MmuNotifyEvent::Exclusive`] naming the device, then the PTE
//!   exchange, then `_end`; the caller maps the returned frames in its
//!   device only under its own invalidation sequence check, so a revoke
//!   that ran in between is never missed;
//! * giving it back: `invalidate_range_start` of `Exclusive` with no owner
//!   (every mirror clears its translation of the page, as for a clear),
//!   the PTE exchange back to the present frame, `_end`; only then does
//!   the CPU access proceed;
//! * munmap, madvise and exit free an exclusive entry's frame as a
//!   present page's, mremap moves the entry, mprotect restores the present
//!   PTE (read-only if it removes write): each under its own event, which
//!   already revokes the device's translation.

use alloc::vec::Vec;

use super::{
    mmu_notifier_invalidate_range_end, mmu_notifier_invalidate_range_start, DeviceOwner,
    FaultError, FaultFlags, Mm, MmapReadGuard, MmuNotifierRange, MmuNotifyEvent, PageState,
    VmFlags, PAGE_SIZE,
};
use crate::errno::Errno;

/// Takes the 4 KiB pages of `[start, end)` from the CPU for `owner`'s
/// device and returns their frames, in address order. Every page must lie
/// in a readable, writable, non-special, non-HUGE VMA (EPERM for a
/// read-only one, EFAULT for a hole, EINVAL for misalignment or a HUGE or
/// special VMA); each is faulted in writable first (a device-private page
/// comes back to system memory). EBUSY: a page changed under the exchange
/// (a racing fault or migration); the pages taken before it stay
/// exclusive, which is harmless (the next CPU access restores them).
/// EBUSY too for a frame another PTE maps ([`Mm::frame_shared`]: a shared
/// VMA after a fork), whose other mapping would keep the CPU's stores
/// flowing (Linux's `folio_make_device_exclusive` fails while the folio
/// is still mapped elsewhere); a private VMA's copy-on-write page is
/// copied by the write fault first, so it is never shared by then.
/// EINVAL also when the mm has no exclusive entries (its
/// [`Mm::pte_exchange`] does not take them).
pub fn make_device_exclusive<M: Mm>(
    mmap: &MmapReadGuard<'_, M>,
    start: u64,
    end: u64,
    owner: DeviceOwner,
) -> Result<Vec<u64>, Errno> {
    let mm = mmap.mm();
    if start >= end || !start.is_multiple_of(PAGE_SIZE) || !end.is_multiple_of(PAGE_SIZE) {
        return Err(Errno::EINVAL);
    }
    let mut addr = start;
    while addr < end {
        let vma = mm.vma_lookup(mmap, addr).ok_or(Errno::EFAULT)?;
        if vma
            .flags
            .intersects(VmFlags::HUGE.union(VmFlags::SPECIAL_KINDS))
        {
            return Err(Errno::EINVAL);
        }
        if !vma.flags.contains(VmFlags::READ.union(VmFlags::WRITE)) {
            return Err(Errno::EPERM);
        }
        let stop = end.min(vma.end);
        while addr < stop {
            let ready = match mm.walk(mmap, addr).state {
                PageState::Present { writable, .. } => writable,
                PageState::Exclusive { owner: o, .. } => o == owner,
                _ => false,
            };
            if !ready {
                mm.handle_mm_fault(mmap, addr, FaultFlags::WRITE | FaultFlags::REMOTE)
                    .map_err(fault_errno)?;
            }
            addr += PAGE_SIZE;
        }
    }
    let range = MmuNotifierRange {
        start,
        end,
        event: MmuNotifyEvent::Exclusive { owner: Some(owner) },
        blockable: true,
    };
    mmu_notifier_invalidate_range_start(mm, &range)?;
    let mut frames = Vec::with_capacity(((end - start) / PAGE_SIZE) as usize);
    let mut result = Ok(());
    for a in (start..end).step_by(PAGE_SIZE as usize) {
        match mm.walk(mmap, a).state {
            PageState::Exclusive { owner: o, pfn, .. } if o == owner => frames.push(pfn),
            old @ PageState::Present {
                pfn,
                writable: true,
            } if !mm.frame_shared(pfn) => {
                let new = PageState::Exclusive {
                    owner,
                    pfn,
                    writable: true,
                };
                match mm.pte_exchange(mmap, a, old, new) {
                    Ok(()) => frames.push(pfn),
                    Err(now) if now == old => {
                        result = Err(Errno::EINVAL);
                        break;
                    }
                    Err(_) => {
                        result = Err(Errno::EBUSY);
                        break;
                    }
                }
            }
            _ => {
                result = Err(Errno::EBUSY);
                break;
            }
        }
    }
    mmu_notifier_invalidate_range_end(mm, &range);
    result.map(|()| frames)
}

/// A CPU fault (or a change of the range) found an exclusive entry at
/// `addr`: announce the revoke ([`MmuNotifyEvent::Exclusive`] with no
/// owner) and put the present PTE back (Linux's
/// `remove_device_exclusive_entry`). Called by an `Mm`'s
/// `handle_mm_fault` with its page-table lock released; the caller walks
/// again afterwards (a racing restore already did the work).
pub fn exclusive_entry_restore<M: Mm>(mmap: &MmapReadGuard<'_, M>, addr: u64) {
    let mm = mmap.mm();
    let page = addr & !(PAGE_SIZE - 1);
    let old @ PageState::Exclusive { pfn, writable, .. } = mm.walk(mmap, page).state else {
        return;
    };
    let range = MmuNotifierRange {
        start: page,
        end: page + PAGE_SIZE,
        event: MmuNotifyEvent::Exclusive { owner: None },
        blockable: true,
    };
    // A blockable invalidation cannot fail.
    let _ = mmu_notifier_invalidate_range_start(mm, &range);
    let _ = mm.pte_exchange(mmap, page, old, PageState::Present { pfn, writable });
    mmu_notifier_invalidate_range_end(mm, &range);
}

fn fault_errno(e: FaultError) -> Errno {
    match e {
        FaultError::Sigsegv => Errno::EFAULT,
        FaultError::Oom => Errno::ENOMEM,
        FaultError::Retry => Errno::EBUSY,
        FaultError::Sigbus => Errno::EFAULT,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::vec::Vec;

    use super::*;
    use crate::mm::{mmap_read_lock, mmu_notifier_register};
    use crate::sim::{SimMm, Spy};

    const BASE: u64 = 0x4000_0000;
    const RW: VmFlags = VmFlags::READ.union(VmFlags::WRITE);
    const PAGES: u64 = 4;

    fn setup() -> (Arc<SimMm>, Arc<Spy>, DeviceOwner) {
        let mm = SimMm::new();
        mm.mmap(BASE, PAGES * PAGE_SIZE, RW).unwrap();
        // Page 0 written, the rest untouched (faulted in by the call).
        mm.write(BASE, &[7u8; 8]).unwrap();
        let spy = Arc::new(Spy::default());
        let weak = Arc::downgrade(&spy);
        mmu_notifier_register(&*mm, weak);
        (mm, spy, DeviceOwner::alloc().unwrap())
    }

    fn take(mm: &SimMm, owner: DeviceOwner) -> Result<Vec<u64>, Errno> {
        let mmap = mmap_read_lock(mm);
        make_device_exclusive(&mmap, BASE, BASE + PAGES * PAGE_SIZE, owner)
    }

    #[test]
    fn exclusive_entries_keep_the_frame_and_a_cpu_access_restores_them() {
        let (mm, spy, owner) = setup();
        let frames_before = mm.frames_in_use();
        let frames = take(&mm, owner).unwrap();
        assert_eq!(frames.len() as u64, PAGES);
        for (i, &pfn) in frames.iter().enumerate() {
            let a = BASE + i as u64 * PAGE_SIZE;
            assert_eq!(
                mm.cpu_state(a),
                PageState::Exclusive {
                    owner,
                    pfn,
                    writable: true
                }
            );
        }
        // Three pages faulted in writable, no frame taken by the entries.
        assert_eq!(mm.frames_in_use(), frames_before + PAGES - 1);
        let ev = spy.0.lock().clone();
        assert_eq!(
            ev.last(),
            Some(&(
                BASE,
                BASE + PAGES * PAGE_SIZE,
                MmuNotifyEvent::Exclusive { owner: Some(owner) }
            ))
        );
        // Asking again changes nothing and announces only the request.
        assert_eq!(take(&mm, owner).unwrap(), frames);
        spy.0.lock().clear();
        // A CPU read of page 0 revokes that page alone, data intact.
        let mut b = [0u8; 8];
        mm.read(BASE, &mut b).unwrap();
        assert_eq!(b, [7u8; 8]);
        assert_eq!(
            mm.cpu_state(BASE),
            PageState::Present {
                pfn: frames[0],
                writable: true
            }
        );
        assert_eq!(
            *spy.0.lock(),
            [(
                BASE,
                BASE + PAGE_SIZE,
                MmuNotifyEvent::Exclusive { owner: None }
            )]
        );
        assert!(matches!(
            mm.cpu_state(BASE + PAGE_SIZE),
            PageState::Exclusive { .. }
        ));
        // munmap frees the frames the exclusive entries keep.
        mm.munmap(BASE, PAGES * PAGE_SIZE).unwrap();
        assert_eq!(mm.frames_in_use(), frames_before - 1);
        assert!(frames.iter().all(|&f| mm.is_freed(f)));
    }

    #[test]
    fn another_owner_takes_the_page_over_and_read_only_is_refused() {
        let (mm, spy, owner) = setup();
        let frames = take(&mm, owner).unwrap();
        let other = DeviceOwner::alloc().unwrap();
        spy.0.lock().clear();
        assert_eq!(take(&mm, other).unwrap(), frames);
        let ev = spy.0.lock().clone();
        let revokes = ev
            .iter()
            .filter(|e| e.2 == MmuNotifyEvent::Exclusive { owner: None })
            .count();
        assert_eq!(revokes as u64, PAGES, "{ev:?}");
        // mprotect to read-only restores the frame, write-protected; a new
        // request is EPERM.
        mm.mprotect(BASE, PAGES * PAGE_SIZE, VmFlags::READ).unwrap();
        assert_eq!(
            mm.cpu_state(BASE),
            PageState::Present {
                pfn: frames[0],
                writable: false
            }
        );
        assert_eq!(take(&mm, owner), Err(Errno::EPERM));
        let mut b = [0u8; 8];
        mm.read(BASE, &mut b).unwrap();
        assert_eq!(b, [7u8; 8]);
    }
}
