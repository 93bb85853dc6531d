//! `fork` of a simulated address space and copy-on-write, as the
//! firmware's mm does them (its `mm::process::fork` docs have the full
//! rules): the child copies every VMA and PTE under the parent's mmap
//! write lock, with no notifiers and no mirror; each private VMA is
//! announced to the parent as one `ProtectionPage` and its pages become
//! read-only on both sides; shared VMAs are populated first (without a
//! shared backing object an untouched page would become two zero pages)
//! and keep their frames writable on both sides. Device-private pages come
//! back to system memory first, device-exclusive entries are restored,
//! migrations waited for. Extra frame references live in the family's
//! [`SharedFrames`](super::frames::SharedFrames); [`SimMm::free`] drops
//! one before it frees anything. A write fault on a private VMA's
//! read-only page whose frame another PTE maps copies it (a 2 MiB page as a unit) under a
//! `Clear` of the page; on the last sharer's frame it only upgrades.

use std::sync::Arc;
use std::vec::Vec;

use super::pt::{pte_index, table_mut, Pmd, SimPte, PTRS};
use super::SimMm;
use crate::errno::Errno;
use crate::mm::fork::fork_prepare;
use crate::mm::{
    mmap_read_lock, mmap_write_lock, mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start, FaultError, Mm, MmuNotifierRange, MmuNotifyEvent,
    PageState, VmFlags, Vma, PAGE_SIZE, PMD_SHIFT, PMD_SIZE,
};

/// Rounds of resolving device-private, exclusive and migration entries
/// before a fork gives up (EAGAIN): each needs a migration to slip in
/// between the read and the write lock.
const FORK_TRIES: u32 = 8;

impl SimMm {
    /// `fork`: the child address space (one user, its own id, the same
    /// frame source and family reference table). EFAULT on a dead mm,
    /// ENOMEM if a page could not be populated, EAGAIN if migrations kept
    /// racing it.
    pub fn fork(&self) -> Result<Arc<SimMm>, Errno> {
        for _ in 0..FORK_TRIES {
            self.fork_prepare()?;
            let vmas = mmap_write_lock(self);
            if self.is_dead() {
                return Err(Errno::EFAULT);
            }
            let all: Vec<Vma> = vmas.vmas.values().copied().collect();
            if all
                .iter()
                .any(|v| self.first_unforkable(v.start, v.end).is_some())
            {
                continue;
            }
            let child = SimMm::with_family(self.source.clone(), self.shared.clone());
            child.mmap.write().vmas = vmas.vmas.clone();
            for v in &all {
                let cow = !v.flags.contains(VmFlags::SHARED);
                let r = MmuNotifierRange {
                    start: v.start,
                    end: v.end,
                    event: MmuNotifyEvent::ProtectionPage,
                    blockable: true,
                };
                if cow {
                    mmu_notifier_invalidate_range_start(self, &r).expect("blockable");
                }
                self.copy_to(&child, v.start, v.end, cow);
                if cow {
                    mmu_notifier_invalidate_range_end(self, &r);
                }
            }
            return Ok(child);
        }
        Err(Errno::EAGAIN)
    }

    /// Under the mmap lock for reading: what the copy cannot take resolved
    /// ([`fork_prepare`]).
    fn fork_prepare(&self) -> Result<(), Errno> {
        let mmap = mmap_read_lock(self);
        if self.is_dead() {
            return Err(Errno::EFAULT);
        }
        fork_prepare(&mmap, |start, end| self.first_unforkable(start, end))
    }

    /// The first device-private, exclusive or migration entry of
    /// `[start, end)`.
    fn first_unforkable(&self, start: u64, end: u64) -> Option<(u64, PageState)> {
        let pt = self.pt.lock();
        let mut best: Option<(u64, PageState)> = None;
        for (&k, pmd) in pt.iter() {
            let base = k << PMD_SHIFT;
            if base + PMD_SIZE <= start || base >= end {
                continue;
            }
            let hit = match pmd {
                Pmd::DevicePrivate { .. } | Pmd::Migration => Some((base, self.pmd_state(pmd))),
                Pmd::Huge { .. } => None,
                Pmd::Table(t) => t.iter().enumerate().find_map(|(i, pte)| {
                    let a = base + i as u64 * PAGE_SIZE;
                    let odd = matches!(
                        pte,
                        SimPte::DevicePrivate { .. } | SimPte::Exclusive { .. } | SimPte::Migration
                    );
                    (odd && (start..end).contains(&a)).then(|| (a, self.pte_state(*pte)))
                }),
            };
            if let Some(h) = hit {
                if best.is_none_or(|b| h.0 < b.0) {
                    best = Some(h);
                }
            }
        }
        best
    }

    /// Copies the PTEs of `[start, end)` into `child` (write-protected on
    /// both sides with `cow`), each frame gaining a reference.
    fn copy_to(&self, child: &SimMm, start: u64, end: u64, cow: bool) {
        let mut pt = self.pt.lock();
        let mut cpt = child.pt.lock();
        let mut shared = Vec::new();
        for (&k, pmd) in pt.iter_mut() {
            let base = k << PMD_SHIFT;
            if base + PMD_SIZE <= start || base >= end {
                continue;
            }
            match pmd {
                Pmd::Huge { pfn, writable } => {
                    *writable &= !cow;
                    shared.extend(*pfn..*pfn + PTRS as u64);
                    cpt.insert(
                        k,
                        Pmd::Huge {
                            pfn: *pfn,
                            writable: *writable,
                        },
                    );
                }
                Pmd::Table(t) => {
                    for (i, pte) in t.iter_mut().enumerate() {
                        let a = base + i as u64 * PAGE_SIZE;
                        if a < start || a >= end || *pte == SimPte::None {
                            continue;
                        }
                        if let SimPte::Page { pfn, writable } = pte {
                            *writable &= !cow;
                            shared.push(*pfn);
                        }
                        table_mut(&mut cpt, a)[pte_index(a)] = *pte;
                    }
                }
                // Resolved before the copy (fork_prepare).
                Pmd::DevicePrivate { .. } | Pmd::Migration => {}
            }
        }
        drop(cpt);
        drop(pt);
        child.frames.lock().in_use += shared.len() as u64;
        self.shared.share(shared);
    }

    /// A write fault on the read-only frame `old` at `addr` (a 2 MiB page
    /// with `huge`) that another PTE maps too: this mm's own copy, under
    /// a `Clear` of the page. If the entry changed meanwhile the copy goes.
    pub(super) fn cow_break(&self, addr: u64, old: u64, huge: bool) -> Result<(), FaultError> {
        let (count, size) = if huge {
            (PTRS as u64, PMD_SIZE)
        } else {
            (1, PAGE_SIZE)
        };
        let page = addr & !(size - 1);
        let fresh = self.alloc(count).ok_or(FaultError::Oom)?;
        let mut buf = std::vec![0u8; PAGE_SIZE as usize];
        for k in 0..count {
            self.source.read(old + k, 0, &mut buf);
            self.source.write(fresh + k, 0, &buf);
        }
        let r = MmuNotifierRange {
            start: page,
            end: page + size,
            event: MmuNotifyEvent::Clear,
            blockable: true,
        };
        mmu_notifier_invalidate_range_start(self, &r).expect("blockable");
        let switched = {
            let mut pt = self.pt.lock();
            if huge {
                match pt.get_mut(&(page >> PMD_SHIFT)) {
                    Some(Pmd::Huge { pfn, writable }) if *pfn == old && !*writable => {
                        (*pfn, *writable) = (fresh, true);
                        true
                    }
                    _ => false,
                }
            } else {
                let pte = &mut table_mut(&mut pt, page)[pte_index(page)];
                let was = SimPte::Page {
                    pfn: old,
                    writable: false,
                };
                let hit = *pte == was;
                if hit {
                    *pte = SimPte::Page {
                        pfn: fresh,
                        writable: true,
                    };
                }
                hit
            }
        };
        mmu_notifier_invalidate_range_end(self, &r);
        let (gone, at) = if switched {
            self.core().count_cow_break();
            (old, count)
        } else {
            (fresh, count)
        };
        self.free((gone..gone + at).collect());
        Ok(())
    }

    /// Frames that more than one PTE of this mm's family maps.
    pub fn shared_frames(&self) -> usize {
        self.shared.len()
    }
}

/// Brings a device-private, exclusive or migration entry back to normal.
#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::vec::Vec;

    use super::*;
    use crate::mm::mmu_notifier_register;
    use crate::sim::Spy;

    const A: u64 = 0x4000_0000;
    const S: u64 = 0x5000_0000;
    const H: u64 = 0x6000_0000;
    const RW: VmFlags = VmFlags::READ.union(VmFlags::WRITE);

    fn word(mm: &SimMm, a: u64) -> u64 {
        let mut b = [0u8; 8];
        mm.read(a, &mut b).unwrap();
        u64::from_le_bytes(b)
    }

    fn put(mm: &SimMm, a: u64, v: u64) {
        mm.write(a, &v.to_le_bytes()).unwrap();
    }

    /// A shared VMA whose leaves lost write through an mprotect round
    /// trip stays shared: the write fault upgrades, it does not copy.
    #[test]
    fn shared_mapping_stays_shared_after_an_mprotect_round_trip() {
        let p = SimMm::new();
        p.mmap(S, 2 * PAGE_SIZE, RW | VmFlags::SHARED).unwrap();
        p.mmap(H, PMD_SIZE, RW | VmFlags::SHARED | VmFlags::HUGE)
            .unwrap();
        put(&p, S, 1);
        put(&p, H, 2);
        let c = p.fork().unwrap();
        for (mm, other) in [(&p, &c), (&c, &p)] {
            for (a, len) in [(S, 2 * PAGE_SIZE), (H, PMD_SIZE)] {
                mm.mprotect(a, len, VmFlags::READ).unwrap();
                mm.mprotect(a, len, RW).unwrap();
                let v = word(mm, a) + 10;
                put(mm, a + PAGE_SIZE, v);
                put(mm, a, v);
                assert_eq!(
                    (word(other, a), word(other, a + PAGE_SIZE)),
                    (v, v),
                    "{a:#x}: the other side lost the shared write"
                );
                assert_eq!(mm.cpu_pfn(a).map(|f| f.0), other.cpu_pfn(a).map(|f| f.0));
            }
        }
        assert_eq!((p.core().cow_breaks(), c.core().cow_breaks()), (0, 0));
        c.exit();
        assert_eq!((word(&p, S), word(&p, H)), (21, 22));
        p.exit();
        assert_eq!(p.frames_in_use(), 0);
        assert_eq!(p.shared_frames(), 0);
    }

    /// Device-exclusive access to a shared mapping's frame that a forked
    /// child maps too is refused: the child's CPU would still store to it.
    #[test]
    fn exclusive_refuses_a_frame_another_process_maps() {
        let p = SimMm::new();
        p.mmap(S, 2 * PAGE_SIZE, RW | VmFlags::SHARED).unwrap();
        put(&p, S, 1);
        let owner = crate::mm::DeviceOwner::alloc().unwrap();
        let take = |mm: &SimMm| {
            let mmap = mmap_read_lock(mm);
            crate::mm::make_device_exclusive(&mmap, S, S + PAGE_SIZE, owner)
        };
        let c = p.fork().unwrap();
        assert_eq!(take(&p), Err(Errno::EBUSY));
        assert!(matches!(
            p.cpu_state(S),
            PageState::Present { writable: true, .. }
        ));
        put(&c, S, 2);
        assert_eq!(word(&p, S), 2);
        c.exit();
        // The last sharer's frame: exclusive again.
        assert_eq!(take(&p).map(|f| f.len()), Ok(1));
        assert!(matches!(p.cpu_state(S), PageState::Exclusive { .. }));
        assert_eq!(word(&p, S), 2);
        p.exit();
        assert_eq!(p.frames_in_use(), 0);
    }

    /// After a fork, address-space surgery on either side keeps the
    /// references right: the parent moves a COW-shared range (mremap
    /// FIXED), the child drops a page (madvise DONTNEED) and unmaps
    /// another (partial munmap); each side reads its data, a write to a
    /// still-shared frame copies it, one the other side let go of is
    /// reused, and every frame comes back after both exits.
    #[test]
    fn surgery_after_fork_keeps_the_references() {
        use crate::mm::{Mremap, MremapFlags};
        let p = SimMm::new();
        p.mmap(A, 4 * PAGE_SIZE, RW).unwrap();
        for i in 0..4 {
            put(&p, A + i * PAGE_SIZE, 10 + i);
        }
        let c = p.fork().unwrap();
        let to = A + 0x100_0000;
        let moved = p.mremap(Mremap {
            old: A,
            old_len: 4 * PAGE_SIZE,
            new_len: 4 * PAGE_SIZE,
            flags: MremapFlags::MAYMOVE | MremapFlags::FIXED,
            new_addr: to,
        });
        assert_eq!(moved, Ok(to));
        c.madvise_dontneed(A + PAGE_SIZE, PAGE_SIZE).unwrap();
        c.munmap(A + 2 * PAGE_SIZE, PAGE_SIZE).unwrap();
        assert_eq!(word(&c, A + PAGE_SIZE), 0, "dropped in the child");
        for i in 0..4 {
            assert_eq!(word(&p, to + i * PAGE_SIZE), 10 + i, "parent page {i}");
        }
        // Pages 1 and 2 are the parent's alone now, 0 and 3 still shared.
        let f1 = p.cpu_pfn(to + PAGE_SIZE).unwrap().0;
        put(&p, to + PAGE_SIZE, 21);
        assert_eq!(
            p.cpu_pfn(to + PAGE_SIZE).unwrap().0,
            f1,
            "copied a sole frame"
        );
        put(&p, to, 20);
        assert_eq!(p.core().cow_breaks(), 1);
        assert_eq!((word(&c, A), word(&c, A + 3 * PAGE_SIZE)), (10, 13));
        c.exit();
        assert_eq!(p.shared_frames(), 0);
        assert_eq!(c.frames_in_use(), 0);
        assert_eq!(word(&p, to + 3 * PAGE_SIZE), 13);
        p.exit();
        assert_eq!(p.frames_in_use(), 0);
    }

    #[test]
    fn fork_shares_copy_on_write_and_frees_on_the_last_reference() {
        let p = SimMm::new();
        p.mmap(A, 4 * PAGE_SIZE, RW).unwrap();
        p.mmap(S, 2 * PAGE_SIZE, RW | VmFlags::SHARED).unwrap();
        p.mmap(H, PMD_SIZE, RW | VmFlags::HUGE).unwrap();
        for i in 0..3 {
            put(&p, A + i * PAGE_SIZE, 10 + i);
        }
        assert_eq!(word(&p, A + 3 * PAGE_SIZE), 0, "page 3: the zero page");
        put(&p, S, 20);
        put(&p, H, 30);
        let spy = Arc::new(Spy::default());
        mmu_notifier_register(&*p, Arc::downgrade(&spy) as _);
        let c = p.fork().unwrap();
        // One write-protection per private VMA; the shared VMA's second
        // page was populated (not mapped before: no notifier).
        assert_eq!(
            *spy.0.lock(),
            [
                (A, A + 4 * PAGE_SIZE, MmuNotifyEvent::ProtectionPage),
                (H, H + PMD_SIZE, MmuNotifyEvent::ProtectionPage),
            ]
        );
        assert_eq!(c.core().notifier_count(), 0, "the child has no notifiers");
        let f0 = p.cpu_pfn(A).unwrap();
        assert_eq!(f0, (c.cpu_pfn(A).unwrap().0, false));
        assert!(p.frame_shared(f0.0) && !p.frame_shared(p.cpu_pfn(A + 3 * PAGE_SIZE).unwrap().0));
        assert_eq!(c.frames_in_use(), p.frames_in_use());
        // Writes: each side its own copy; the last sharer reuses the frame.
        put(&c, A, 100);
        assert_eq!((word(&p, A), word(&c, A)), (10, 100));
        assert_eq!((c.core().cow_breaks(), p.core().cow_breaks()), (1, 0));
        put(&p, A, 11);
        assert_eq!(
            p.cpu_pfn(A).unwrap(),
            (f0.0, true),
            "the last sharer copied"
        );
        put(&p, H + 8, 31);
        assert_eq!((word(&c, H), word(&c, H + 8), word(&p, H)), (30, 0, 30));
        assert_eq!(p.core().cow_breaks(), 1, "2 MiB page: one break");
        // Shared: the same frames both ways.
        put(&c, S + PAGE_SIZE, 21);
        put(&p, S + 8, 22);
        assert_eq!((word(&p, S + PAGE_SIZE), word(&c, S + 8)), (21, 22));
        assert_eq!(p.cpu_pfn(S), c.cpu_pfn(S));
        // The child exits: nothing the parent maps is freed.
        let theirs: Vec<u64> = [A, A + PAGE_SIZE, A + 2 * PAGE_SIZE, S, S + PAGE_SIZE]
            .iter()
            .map(|&a| p.cpu_pfn(a).unwrap().0)
            .collect();
        let child_h = c.cpu_pfn(H).unwrap().0;
        c.exit();
        assert!(theirs.iter().all(|&f| !p.is_freed(f) && !c.is_freed(f)));
        assert!(
            c.is_freed(child_h),
            "the child's 2 MiB page stays allocated"
        );
        assert_eq!(c.frames_in_use(), 0);
        assert_eq!((word(&p, A + PAGE_SIZE), word(&p, S + PAGE_SIZE)), (11, 21));
        assert_eq!(
            p.shared_frames(),
            0,
            "references left after the child's exit"
        );
        let f1 = p.cpu_pfn(A + PAGE_SIZE).unwrap().0;
        put(&p, A + PAGE_SIZE, 12);
        assert_eq!(p.cpu_pfn(A + PAGE_SIZE).unwrap().0, f1);
        p.exit();
        assert!(theirs.iter().all(|&f| p.is_freed(f)));
        assert_eq!(p.frames_in_use(), 0);
    }
}
