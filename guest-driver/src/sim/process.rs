//! What the process does to its simulated address space: mmap, munmap,
//! mprotect, mremap, madvise(DONTNEED), reclaim (each bracketed by the
//! notifier chain), and CPU
//! accesses that fault pages in as the CPU would.

use super::pt::{move_range, pte_index, restore_exclusive, table_mut, write_protect, SimPte};
use super::{SimMm, SimVmas};
use crate::errno::Errno;
use crate::mm::{
    mmap_read_lock, mmap_write_lock, mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start, splits_huge, FaultError, FaultFlags, Mm, MmuNotifierRange,
    MmuNotifyEvent, Mremap, MremapPlan, PageState, VmFlags, Vma, PAGE_SHIFT, PAGE_SIZE, PMD_SIZE,
};
use std::vec::Vec;

impl SimMm {
    /// `mmap(start, len, prot, MAP_FIXED_NOREPLACE)`. EINVAL if misaligned
    /// (2 MiB for HUGE) or overlapping an existing VMA.
    pub fn mmap(&self, start: u64, len: u64, flags: VmFlags) -> Result<(), Errno> {
        let align = if flags.contains(VmFlags::HUGE) {
            PMD_SIZE
        } else {
            PAGE_SIZE
        };
        if !start.is_multiple_of(align) || !len.is_multiple_of(align) || len == 0 {
            return Err(Errno::EINVAL);
        }
        let mut vmas = mmap_write_lock(self);
        if !vmas.overlapping(start, start + len).is_empty() {
            return Err(Errno::EINVAL);
        }
        vmas.vmas.insert(
            start,
            Vma {
                start,
                end: start + len,
                flags,
            },
        );
        Ok(())
    }

    /// `munmap(start, len)`: remove the VMAs and free the frames, after
    /// telling the notifiers (event `Unmap`). EINVAL if it would cut a
    /// 2 MiB page.
    pub fn munmap(&self, start: u64, len: u64) -> Result<(), Errno> {
        let end = start + len;
        let mut vmas = mmap_write_lock(self);
        if splits_huge(vmas.vmas.values(), start, end) {
            return Err(Errno::EINVAL);
        }
        let zapped = self.unmap_locked(&mut vmas, start, end);
        drop(vmas);
        self.free_zapped(zapped);
        Ok(())
    }

    /// The body of munmap, under the mmap write lock: the `Unmap` covers
    /// the mapped span of the range (nothing at all over a hole, as
    /// Linux); the caller frees what it returns once the lock is dropped.
    fn unmap_locked(&self, vmas: &mut SimVmas, start: u64, end: u64) -> super::Zapped {
        vmas.split_at(start);
        vmas.split_at(end);
        let gone = vmas.overlapping(start, end);
        let (Some(first), Some(last)) = (gone.first(), gone.last()) else {
            return super::Zapped::default();
        };
        let (lo, hi) = (first.start, last.end);
        for v in &gone {
            vmas.vmas.remove(&v.start);
        }
        self.zap_range(lo, hi, MmuNotifyEvent::Unmap)
    }

    /// `mremap`: see [`Mremap::plan`] for what it does and refuses. The
    /// moved PTEs keep their frames and device pages (nothing is copied or
    /// freed); the old range they leave is announced as an `Unmap`, the
    /// new one needs no announcement (nothing was mapped there). Returns
    /// the new address.
    pub fn mremap(&self, args: Mremap) -> Result<u64, Errno> {
        let mut vmas = mmap_write_lock(self);
        let vma = vmas.lookup(args.old);
        let plan = args.plan(
            vma,
            |a, b| vmas.overlapping(a, b).is_empty(),
            |len, align| vmas.find_free(len, align),
        )?;
        let mut zapped = Vec::new();
        let addr = match plan {
            MremapPlan::Same => args.old,
            MremapPlan::Shrink { start, end } => {
                zapped.push(self.unmap_locked(&mut vmas, start, end));
                args.old
            }
            MremapPlan::Grow { end, .. } => {
                // The VMA itself grows (it ends where the range does).
                let v = vma.expect("planned");
                vmas.vmas.insert(v.start, Vma { end, ..v });
                args.old
            }
            MremapPlan::Move {
                to,
                fixed,
                moved,
                dontunmap,
            } => {
                let new_end = to + args.new_len;
                if fixed && splits_huge(vmas.vmas.values(), to, new_end) {
                    return Err(Errno::EINVAL);
                }
                let flags = vma.expect("planned").flags;
                if fixed {
                    zapped.push(self.unmap_locked(&mut vmas, to, new_end));
                }
                let (start, end) = (args.old, args.old + moved);
                if args.old_len > moved {
                    zapped.push(self.unmap_locked(&mut vmas, end, args.old + args.old_len));
                }
                if !dontunmap {
                    vmas.split_at(start);
                    vmas.split_at(end);
                    for v in vmas.overlapping(start, end) {
                        vmas.vmas.remove(&v.start);
                    }
                }
                vmas.vmas.insert(
                    to,
                    Vma {
                        start: to,
                        end: new_end,
                        flags,
                    },
                );
                let r = MmuNotifierRange {
                    start,
                    end,
                    event: MmuNotifyEvent::Unmap,
                    blockable: true,
                };
                mmu_notifier_invalidate_range_start(self, &r).expect("blockable");
                move_range(&mut self.pt.lock(), start, end, to);
                mmu_notifier_invalidate_range_end(self, &r);
                to
            }
        };
        drop(vmas);
        for z in zapped {
            self.free_zapped(z);
        }
        Ok(addr)
    }

    /// `madvise(start, len, MADV_DONTNEED)`: drop the pages of every VMA
    /// in the range, each announced as a `Clear` of its part; the next
    /// access faults fresh zero pages, device-private pages go back to
    /// their owners. EINVAL if misaligned, if it would cut a 2 MiB page or
    /// meets a special VMA; ENOMEM (after dropping what is mapped) if the
    /// range has holes, as Linux.
    pub fn madvise_dontneed(&self, start: u64, len: u64) -> Result<(), Errno> {
        if !start.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        let end = start + len.next_multiple_of(PAGE_SIZE);
        let vmas = mmap_read_lock(self);
        let parts = vmas.overlapping(start, end);
        if splits_huge(&parts, start, end)
            || parts
                .iter()
                .any(|v| v.flags.intersects(VmFlags::SPECIAL_KINDS))
        {
            return Err(Errno::EINVAL);
        }
        let mut covered = 0;
        for v in &parts {
            let (a, b) = (v.start.max(start), v.end.min(end));
            covered += b - a;
            let zapped = self.zap_range(a, b, MmuNotifyEvent::Clear);
            self.free_zapped(zapped);
        }
        if covered < end - start {
            return Err(Errno::ENOMEM);
        }
        Ok(())
    }

    /// `mprotect(start, len, prot)`: replace READ/WRITE/EXEC of the covered
    /// VMAs, write-protecting PTEs when WRITE goes away. EINVAL if it would
    /// cut a 2 MiB page. Unlike Linux (and the firmware's mm) a range with
    /// holes is accepted: the property test relies on it. Announced even for
    /// upgrades, as Linux does, with [`MmuNotifyEvent::for_mprotect`]'s
    /// event (`ProtectionPage` for read-only, else `ProtectionVma`).
    pub fn mprotect(&self, start: u64, len: u64, prot: VmFlags) -> Result<(), Errno> {
        let end = start + len;
        let perms = VmFlags::READ | VmFlags::WRITE | VmFlags::EXEC;
        let mut vmas = mmap_write_lock(self);
        if splits_huge(vmas.vmas.values(), start, end) {
            return Err(Errno::EINVAL);
        }
        vmas.split_at(start);
        vmas.split_at(end);
        for v in vmas.overlapping(start, end) {
            let flags = (v.flags - perms) | (prot & perms);
            vmas.vmas.insert(v.start, Vma { flags, ..v });
        }
        let r = MmuNotifierRange {
            start,
            end,
            event: MmuNotifyEvent::for_mprotect(prot),
            blockable: true,
        };
        mmu_notifier_invalidate_range_start(self, &r).expect("blockable");
        let mut pt = self.pt.lock();
        restore_exclusive(&mut pt, start, end);
        if !prot.contains(VmFlags::WRITE) {
            write_protect(&mut pt, start, end);
        }
        drop(pt);
        mmu_notifier_invalidate_range_end(self, &r);
        Ok(())
    }

    /// Page reclaim / migration: drop the translations in `[start, end)`
    /// *without* the mmap lock (event `Clear`), then free the frames. This is
    /// the invalidation that can race with a fault in progress.
    pub fn reclaim(&self, start: u64, end: u64) -> usize {
        let zapped = self.zap_range(start, end, MmuNotifyEvent::Clear);
        let n = zapped.frames.len();
        self.free_zapped(zapped);
        n
    }

    /// Like [`SimMm::reclaim`] from a context that must not block (the OOM
    /// reaper): EAGAIN, and nothing changed, if a notifier would block.
    pub fn reclaim_nonblock(&self, start: u64, end: u64) -> Result<usize, Errno> {
        let r = MmuNotifierRange {
            start,
            end,
            event: MmuNotifyEvent::Clear,
            blockable: false,
        };
        mmu_notifier_invalidate_range_start(self, &r)?;
        let zapped = self.zap_pt(start, end);
        mmu_notifier_invalidate_range_end(self, &r);
        let n = zapped.frames.len();
        self.free_zapped(zapped);
        Ok(n)
    }

    fn zap_range(&self, start: u64, end: u64, event: MmuNotifyEvent) -> super::Zapped {
        let r = MmuNotifierRange {
            start,
            end,
            event,
            blockable: true,
        };
        mmu_notifier_invalidate_range_start(self, &r).expect("blockable");
        let zapped = self.zap_pt(start, end);
        mmu_notifier_invalidate_range_end(self, &r);
        zapped
    }

    /// A CPU access from the process itself (not remote): fault if needed.
    pub fn touch(&self, addr: u64, write: bool) -> Result<(), FaultError> {
        let mmap = mmap_read_lock(self);
        let vma = mmap.lookup(addr).ok_or(FaultError::Sigsegv)?;
        if !vma.flags.contains(VmFlags::READ) || (write && !vma.flags.contains(VmFlags::WRITE)) {
            // PROT_NONE keeps its PTEs (as Linux's protnone) but the CPU may
            // not use them.
            return Err(FaultError::Sigsegv);
        }
        let ok = match self.walk(&mmap, addr).state {
            PageState::Present { writable, .. } | PageState::Huge { writable, .. } => {
                writable || !write
            }
            PageState::Zero { .. } => !write,
            PageState::Special => true,
            PageState::None
            | PageState::DevicePrivate { .. }
            | PageState::Migration
            | PageState::Exclusive { .. } => false,
        };
        if ok {
            return Ok(());
        }
        let flags = if write {
            FaultFlags::WRITE
        } else {
            FaultFlags::empty()
        };
        self.handle_mm_fault(&mmap, addr, flags)
    }

    /// Touch every page (every 2 MiB in a HUGE VMA) of `[start, start+len)`.
    pub fn populate(&self, start: u64, len: u64, write: bool) -> Result<(), FaultError> {
        let mut a = start;
        while a < start + len {
            self.touch(a, write)?;
            let huge = mmap_read_lock(self)
                .lookup(a)
                .is_some_and(|v| v.flags.contains(VmFlags::HUGE));
            a += if huge { PMD_SIZE } else { PAGE_SIZE };
        }
        Ok(())
    }

    /// Install a special PTE (a raw pfn, Linux `vm_insert_pfn`) at `addr`.
    pub fn map_special(&self, addr: u64) {
        let _mmap = mmap_read_lock(self);
        table_mut(&mut self.pt.lock(), addr)[pte_index(addr)] = SimPte::Special;
    }

    /// The CPU's translation of `addr` right now.
    pub fn cpu_state(&self, addr: u64) -> PageState {
        let mmap = mmap_read_lock(self);
        self.walk(&mmap, addr).state
    }

    /// The frame backing `addr` (resolving huge leaves), if mapped.
    pub fn cpu_pfn(&self, addr: u64) -> Option<(u64, bool)> {
        Self::pfn_of(addr, self.cpu_state(addr))
    }

    /// What the CPU's table holds for `addr`, under the page-table lock
    /// alone, for a device that checks its translations: it runs while a
    /// munmap holding the mmap lock waits for the device. A frame comes
    /// back as `(pfn, writable)` with huge leaves resolved to the page of
    /// `addr`; anything else as the raw state.
    pub fn cpu_translation(&self, addr: u64) -> Result<(u64, bool), PageState> {
        let state = self.pt_walk(addr).state;
        Self::pfn_of(addr, state).ok_or(state)
    }

    /// The mm's [`Mm::cpu_root`] id, for a host's table of address spaces.
    pub fn id(&self) -> u32 {
        self.id
    }

    fn pfn_of(addr: u64, state: PageState) -> Option<(u64, bool)> {
        match state {
            PageState::Present { pfn, writable } => Some((pfn, writable)),
            PageState::Huge { pfn, writable } => {
                Some((pfn + ((addr % PMD_SIZE) >> PAGE_SHIFT), writable))
            }
            PageState::Zero { pfn } => Some((pfn, false)),
            // For the device holding it, the frame as it was mapped.
            PageState::Exclusive { pfn, writable, .. } => Some((pfn, writable)),
            PageState::None
            | PageState::Special
            | PageState::DevicePrivate { .. }
            | PageState::Migration => None,
        }
    }

    /// A CPU access of the process to `[addr, addr + len)`: faults pages in
    /// like the CPU would (SIGSEGV on a hole, PROT_NONE or a write to a
    /// read-only mapping) and calls `f(pfn, offset, chunk_start, chunk_len)`
    /// per page with the mmap lock held, so the frame cannot be unmapped
    /// in between (reclaim aside).
    fn access(
        &self,
        addr: u64,
        len: usize,
        write: bool,
        mut f: impl FnMut(u64, usize, usize, usize),
    ) -> Result<(), FaultError> {
        let mut done = 0usize;
        while done < len {
            let a = addr + done as u64;
            let off = (a % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE as usize - off).min(len - done);
            let mmap = mmap_read_lock(self);
            let vma = mmap.lookup(a).ok_or(FaultError::Sigsegv)?;
            if !vma.flags.contains(VmFlags::READ) || (write && !vma.flags.contains(VmFlags::WRITE))
            {
                return Err(FaultError::Sigsegv);
            }
            let mut tries = 0;
            let pfn = loop {
                let (pfn, ok) = match self.walk(&mmap, a).state {
                    PageState::Present { pfn, writable } => (pfn, writable || !write),
                    PageState::Huge { pfn, writable } => {
                        (pfn + ((a % PMD_SIZE) >> PAGE_SHIFT), writable || !write)
                    }
                    PageState::Zero { pfn } => (pfn, !write),
                    PageState::Special => return Err(FaultError::Sigbus),
                    PageState::None
                    | PageState::DevicePrivate { .. }
                    | PageState::Migration
                    | PageState::Exclusive { .. } => (0, false),
                };
                if ok {
                    break pfn;
                }
                tries += 1;
                if tries > 3 {
                    return Err(FaultError::Sigbus);
                }
                let flags = if write {
                    FaultFlags::WRITE
                } else {
                    FaultFlags::empty()
                };
                self.handle_mm_fault(&mmap, a, flags)?;
            };
            f(pfn, off, done, n);
            done += n;
        }
        Ok(())
    }

    /// CPU read of process memory (faults pages in; SIGSEGV as an error).
    pub fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), FaultError> {
        let src = self.source.clone();
        self.access(addr, out.len(), false, |pfn, off, at, n| {
            src.read(pfn, off, &mut out[at..at + n])
        })
    }

    /// CPU write of process memory (faults pages in, copy-on-write).
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), FaultError> {
        let src = self.source.clone();
        self.access(addr, data.len(), true, |pfn, off, at, n| {
            src.write(pfn, off, &data[at..at + n])
        })
    }

    /// CPU `lock xadd` on the naturally aligned u64 at `addr`; the old value.
    pub fn atomic_add_u64(&self, addr: u64, v: u64) -> Result<u64, FaultError> {
        if !addr.is_multiple_of(8) {
            return Err(FaultError::Sigbus);
        }
        let src = self.source.clone();
        let mut old = 0;
        self.access(addr, 8, true, |pfn, off, _, _| {
            old = src.atomic_add_u64(pfn, off, v)
        })?;
        Ok(old)
    }
}
