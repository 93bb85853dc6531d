//! Device memory for SVM (nouveau's `dmem`, test_hmm's device side): the
//! GPU's VRAM as device-private pages of the address spaces it mirrors.
//!
//! A [`DeviceMemory`] is one GPU's VRAM ([`VramAllocator`], 4 KiB pages)
//! under one [`DeviceOwner`] id, with its own context and channel for the
//! copy engine (MIGRATE bypasses the MMU, so the context maps nothing).
//! [`DeviceMemory::attach`] registers it on an [`SvmContext`]'s address
//! space (a `dev_pagemap`) and makes the context's fault handler map its
//! pages with VRAM leaves; then:
//!
//! * [`DeviceMemory::migrate_to_device`] / [`DeviceMemory::migrate_to_system`]
//!   (test_hmm's MIGRATE_TO_DEV / MIGRATE_TO_SYS) move the pages of a range
//!   with `migrate_vma_setup` / MIGRATE batches / `migrate_pages` /
//!   `finalize`;
//! * a CPU access to a device page comes back through `migrate_to_ram` (one
//!   MIGRATE of one page into the frame the mm allocated);
//! * munmap and exit free device pages through `page_free`.
//!
//! Rules: the copy engine is used by one migration at a time (the channel's
//! lock is never held while calling into the mm); a failed copy leaves
//! every page where it was (the migration restores the old entries and the
//! VRAM pages or frames allocated for it go back), except that the frames
//! a MIGRATE that timed out was to write are never given back: the device
//! may still write them. Device pages of this memory must be migrated back
//! before [`DeviceMemory::detach`].

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use faultline_abi::{PhysPage, PAGE_SIZE};

use super::vram::{VramLeak, VramUsage, CHUNK_BYTES};
use super::{
    Channel, Context, DmaRegion, DriverCounters, Gpu, GpuError, MigrateList, PageSize, PageTable,
    Platform, SvmContext, VramAllocator,
};
use crate::errno::Errno;
use crate::mm::migrate::{
    dev_pagemap_registered, migrate_vma_setup, MigratePfn, MigrateSelect, MigrateSrc,
};
use crate::mm::{
    dev_pagemap_register, dev_pagemap_unregister, mmap_read_lock, DevPagemapOps, DeviceOwner, Mm,
    MmapReadGuard, PAGE_SHIFT,
};
use crate::sync::SpinMutex;

/// The copy engine's side: a channel on a context of its own and the
/// reusable MIGRATE list. Fields drop in order: the channel before its
/// context.
struct Copier<P: Platform> {
    chan: Channel<P>,
    list: MigrateList<P>,
    _ctx: Context<P>,
}

struct Dmem<P: Platform> {
    owner: DeviceOwner,
    /// Pages of `[base, base + size)` of VRAM, as offsets from `base`.
    vram: VramAllocator,
    base: u64,
    copier: SpinMutex<Copier<P>>,
    /// A zeroed page: the source for holes and the zero page (taken by
    /// drop), and its address.
    zero: Option<DmaRegion>,
    zero_phys: u64,
    platform: Arc<P>,
    /// The GPU, whose driver counters (the per-test stats line) count
    /// migrations too.
    gpu: Arc<Gpu<P>>,
    to_device: AtomicU64,
    to_system: AtomicU64,
    cpu_faults: AtomicU64,
}

/// What a [`DeviceMemory`] did (4 KiB pages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DmemStats {
    /// Pages migrated to VRAM.
    pub to_device: u64,
    /// Pages migrated back by [`DeviceMemory::migrate_to_system`].
    pub to_system: u64,
    /// Pages a CPU fault brought back (`migrate_to_ram`).
    pub cpu_faults: u64,
    /// VRAM allocated now.
    pub vram: VramUsage,
}

/// One GPU's VRAM as device-private memory.
pub struct DeviceMemory<P: Platform> {
    inner: Arc<Dmem<P>>,
}

impl<P: Platform> DeviceMemory<P> {
    /// All the VRAM of `gpu` under a fresh owner id. `Invalid` without
    /// VRAM, `NoMemory` when DMA memory or owner ids ran out. One per GPU:
    /// two device memories over the same VRAM would hand out the same
    /// pages ([`DeviceMemory::part`] splits it).
    pub fn new(gpu: &Arc<Gpu<P>>) -> Result<Self, GpuError> {
        Self::part(gpu, 0, gpu.vram_size())
    }

    /// `[offset, offset + size)` of `gpu`'s VRAM (2 MiB aligned, inside
    /// VRAM) as a device memory of its own, with its own owner id: the
    /// parts of one GPU's VRAM, each given to one `DeviceMemory`, behave
    /// as separate devices. `Invalid` for an empty, misaligned or
    /// out-of-range part.
    pub fn part(gpu: &Arc<Gpu<P>>, offset: u64, size: u64) -> Result<Self, GpuError> {
        let inside = offset
            .checked_add(size)
            .is_some_and(|end| end <= gpu.vram_size());
        if size == 0 || !inside {
            return Err(GpuError::Invalid("no such part of the GPU's VRAM"));
        }
        if !offset.is_multiple_of(CHUNK_BYTES) || !size.is_multiple_of(CHUNK_BYTES) {
            return Err(GpuError::Invalid("VRAM parts are whole 2 MiB chunks"));
        }
        let owner = DeviceOwner::alloc().ok_or(GpuError::NoMemory)?;
        let platform = gpu.platform().clone();
        let ctx = Context::new(gpu, PageTable::new(platform.clone())?)?;
        let chan = Channel::open(&ctx)?;
        let list = MigrateList::new(platform.clone())?;
        let zero = platform.dma_alloc(1).ok_or(GpuError::NoMemory)?;
        Ok(DeviceMemory {
            inner: Arc::new(Dmem {
                owner,
                vram: VramAllocator::new(size),
                base: offset,
                copier: SpinMutex::new(Copier {
                    chan,
                    list,
                    _ctx: ctx,
                }),
                zero_phys: zero.phys(),
                zero: Some(zero),
                platform,
                gpu: gpu.clone(),
                to_device: AtomicU64::new(0),
                to_system: AtomicU64::new(0),
                cpu_faults: AtomicU64::new(0),
            }),
        })
    }

    /// The owner id its device-private entries carry.
    pub fn owner(&self) -> DeviceOwner {
        self.inner.owner
    }

    /// Serve `svm`'s address space: register the pagemap there and have
    /// the context map this memory's pages with VRAM leaves. EBUSY (as
    /// `GpuError::Mm`) if attached already.
    pub fn attach<M: Mm>(&self, svm: &SvmContext<P, M>) -> Result<(), GpuError> {
        let ops: Arc<dyn DevPagemapOps<M>> = self.inner.clone();
        dev_pagemap_register(&**svm.mm(), self.inner.owner, ops).map_err(GpuError::Mm)?;
        svm.set_device_owner(Some(self.inner.owner));
        Ok(())
    }

    /// Stop serving `svm`'s address space (migrate its pages back first).
    pub fn detach<M: Mm>(&self, svm: &SvmContext<P, M>) {
        svm.set_device_owner(None);
        dev_pagemap_unregister(&**svm.mm(), self.inner.owner);
    }

    /// Migrate the system pages of `[start, end)` (page aligned; holes and
    /// the zero page become zeroed VRAM pages) to VRAM, VMA by VMA, until
    /// VRAM is full. Returns the pages migrated. Pages of shared, huge or
    /// inaccessible VMAs stay (0 for a shared mapping); the gaps between
    /// VMAs are skipped. A copy error leaves the failing VMA's pages in
    /// system memory and is returned.
    pub fn migrate_to_device<M: Mm>(
        &self,
        svm: &SvmContext<P, M>,
        start: u64,
        end: u64,
    ) -> Result<u64, GpuError> {
        let d = &*self.inner;
        let (n, _full) = self.migrate(svm, start, end, MigrateSelect::SYSTEM, |_, src| {
            match src {
                MigrateSrc::Page(MigratePfn::System { .. }) | MigrateSrc::Empty => {}
                _ => return Step::Skip,
            }
            match d.vram.alloc_page() {
                Some(v) => Step::To(MigratePfn::Device {
                    owner: d.owner,
                    vram_pfn: (d.base + v) >> PAGE_SHIFT,
                }),
                None => Step::Full,
            }
        })?;
        d.to_device.fetch_add(n, Ordering::Relaxed);
        DriverCounters::add(&d.gpu.counters().pages_to_vram, n);
        Ok(n)
    }

    /// Migrate this memory's pages of `[start, end)` back to system memory.
    /// Returns the pages migrated; `NoMemory` if frames ran out (the pages
    /// not copied stay in VRAM).
    pub fn migrate_to_system<M: Mm>(
        &self,
        svm: &SvmContext<P, M>,
        start: u64,
        end: u64,
    ) -> Result<u64, GpuError> {
        let select = MigrateSelect::DEVICE_PRIVATE;
        let (n, full) = self.migrate(svm, start, end, select, |mm, src| match src {
            MigrateSrc::Page(MigratePfn::Device { .. }) => match mm.alloc_frame() {
                Some(pfn) => Step::To(MigratePfn::System { pfn }),
                None => Step::Full,
            },
            _ => Step::Skip,
        })?;
        self.inner.to_system.fetch_add(n, Ordering::Relaxed);
        DriverCounters::add(&self.inner.gpu.counters().pages_to_system, n);
        if full {
            return Err(GpuError::NoMemory);
        }
        Ok(n)
    }

    /// One migration of `[start, end)`, VMA by VMA: collect what `select`
    /// asks for, a destination per page from `dst` (until it says
    /// [`Step::Full`]), one MIGRATE batch, install, finalize. Returns the
    /// pages migrated and whether `dst` ran out.
    fn migrate<M: Mm>(
        &self,
        svm: &SvmContext<P, M>,
        start: u64,
        end: u64,
        select: MigrateSelect,
        mut dst: impl FnMut(&M, MigrateSrc) -> Step,
    ) -> Result<(u64, bool), GpuError> {
        let d = &*self.inner;
        let mm = &**svm.mm();
        if !dev_pagemap_registered(mm, d.owner) {
            return Err(GpuError::Invalid(
                "device memory not attached to this context",
            ));
        }
        let mmap = mmap_read_lock(mm);
        let mut total = 0;
        for (a, b) in vma_pieces(&mmap, start, end)? {
            let mut mig =
                migrate_vma_setup(&mmap, a, b, select, Some(d.owner)).map_err(GpuError::Mm)?;
            if let Some(hook) = svm.migrate_hook() {
                hook(&mmap, a, b);
            }
            let mut pairs = Vec::new();
            let mut dsts = Vec::new();
            let mut full = false;
            for (i, p) in mig.pages().iter().enumerate() {
                let to = match dst(mm, p.src) {
                    Step::Skip => continue,
                    Step::Full => {
                        full = true;
                        break;
                    }
                    Step::To(to) => to,
                };
                let from = match p.src {
                    MigrateSrc::Page(from) => phys(from),
                    MigrateSrc::Empty | MigrateSrc::Skip => PhysPage::system(d.zero_phys),
                };
                pairs.push((from, phys(to)));
                dsts.push((i, to));
            }
            if let Err(e) = d.copy(&pairs) {
                let late = may_still_write(&e);
                for &(_, to) in &dsts {
                    if !(late && matches!(to, MigratePfn::System { .. })) {
                        to.free(mm);
                    }
                }
                return Err(e);
            }
            for &(i, to) in &dsts {
                mig.set_dst(i, to);
            }
            mig.migrate_pages();
            total += mig.finalize() as u64;
            if full {
                return Ok((total, true));
            }
        }
        Ok((total, false))
    }

    /// What it did and holds.
    pub fn stats(&self) -> DmemStats {
        let d = &*self.inner;
        DmemStats {
            to_device: d.to_device.load(Ordering::Relaxed),
            to_system: d.to_system.load(Ordering::Relaxed),
            cpu_faults: d.cpu_faults.load(Ordering::Relaxed),
            vram: d.vram.usage(),
        }
    }

    /// The leak check: `Err` names the VRAM still allocated.
    pub fn teardown(self) -> Result<(), VramLeak> {
        match self.inner.vram.usage() {
            u if u == VramUsage::default() => Ok(()),
            u => Err(VramLeak(u)),
        }
    }
}

/// Whether a failed copy may still write its destinations: the device did
/// not complete the MIGRATE in time, so it may run later. Frames it was to
/// write are then never given back (they leak rather than be overwritten
/// in their next user's hands). VRAM pages may go back: only MIGRATEs on
/// the copy channel fill a free one, in order, and `MigrateList` retires
/// its list after a timeout, so every later copy fails before submitting.
fn may_still_write(e: &GpuError) -> bool {
    if matches!(e, GpuError::Timeout(_)) {
        log::error!("dmem: MIGRATE timed out; the frames it was to write are never reused");
        return true;
    }
    false
}

/// What a migration does with one collected page.
enum Step {
    /// Leave it.
    Skip,
    /// No destination left: stop the migration here.
    Full,
    /// Copy it there.
    To(MigratePfn),
}

/// A migration page as the copy engine names it.
fn phys(p: MigratePfn) -> PhysPage {
    match p {
        MigratePfn::System { pfn } => PhysPage::system(pfn << PAGE_SHIFT),
        MigratePfn::Device { vram_pfn, .. } => PhysPage::vram(vram_pfn << PAGE_SHIFT),
    }
}

/// The parts of `[start, end)` inside VMAs, in order. EINVAL if unaligned
/// or empty.
fn vma_pieces<M: Mm>(
    mmap: &MmapReadGuard<'_, M>,
    start: u64,
    end: u64,
) -> Result<Vec<(u64, u64)>, GpuError> {
    if start >= end || !start.is_multiple_of(PAGE_SIZE) || !end.is_multiple_of(PAGE_SIZE) {
        return Err(GpuError::Mm(Errno::EINVAL));
    }
    let mm = mmap.mm();
    let mut pieces = Vec::new();
    let mut a = start;
    while a < end {
        match mm.vma_lookup(mmap, a) {
            Some(v) => {
                let b = v.end.min(end);
                pieces.push((a, b));
                a = b;
            }
            None => a += PAGE_SIZE,
        }
    }
    Ok(pieces)
}

impl<P: Platform> Dmem<P> {
    /// One MIGRATE batch of 4 KiB pages (nothing for none).
    fn copy(&self, pairs: &[(PhysPage, PhysPage)]) -> Result<(), GpuError> {
        if pairs.is_empty() {
            return Ok(());
        }
        let mut c = self.copier.lock();
        let Copier { chan, list, .. } = &mut *c;
        list.run(chan, pairs, PageSize::Size4K).map(|_| ())
    }

    /// Give back the VRAM page at offset `v`.
    fn free_vram(&self, v: u64) {
        let r = v
            .checked_sub(self.base)
            .ok_or(GpuError::Invalid("not this memory's VRAM"))
            .and_then(|o| self.vram.free_page(o));
        if let Err(e) = r {
            log::error!("dmem: VRAM page {v:#x}: {e}");
        }
    }
}

impl<P: Platform, M: Mm> DevPagemapOps<M> for Dmem<P> {
    fn migrate_to_ram(
        &self,
        _mm: &M,
        _addr: u64,
        vram_pfn: u64,
        dst_pfn: u64,
    ) -> Result<(), Errno> {
        let owner = self.owner;
        let pair = (
            phys(MigratePfn::Device { owner, vram_pfn }),
            phys(MigratePfn::System { pfn: dst_pfn }),
        );
        self.copy(&[pair]).map_err(|e| {
            log::warn!("dmem: migrate_to_ram of VRAM page {vram_pfn:#x}: {e}");
            if may_still_write(&e) {
                Errno::EBUSY
            } else {
                Errno::EFAULT
            }
        })?;
        self.cpu_faults.fetch_add(1, Ordering::Relaxed);
        DriverCounters::add(&self.gpu.counters().pages_cpu_faulted_back, 1);
        Ok(())
    }

    fn page_free(&self, vram_pfn: u64) {
        self.free_vram(vram_pfn << PAGE_SHIFT);
    }
}

impl<P: Platform> Drop for Dmem<P> {
    fn drop(&mut self) {
        if let Some(zero) = self.zero.take() {
            self.platform.dma_free(zero);
        }
    }
}
