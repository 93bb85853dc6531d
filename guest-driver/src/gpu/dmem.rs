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
//! * under [`MigratePolicy::FirstTouch`](super::MigratePolicy) the
//!   context's fault handler migrates each faulting window the same way
//!   before it maps it (`AttachedMemory::migrate_on_fault`, called with no
//!   lock held, so a full VRAM evicts as for any migration);
//! * a CPU access to a device page comes back through `migrate_to_ram` (one
//!   MIGRATE of one page into the frame the mm allocated);
//! * munmap and exit free device pages through `page_free`.
//!
//! A HUGE VMA's 2 MiB pages move whole: each to a whole VRAM chunk (one
//! LARGE MIGRATE entry; a hole's chunk is zeroed by 512 4 KiB ones) and
//! back into a run of 512 frames (`migrate_to_ram` with `huge`, and
//! `page_free` with `huge` frees the chunk). A HUGE VMA takes no 4 KiB pages, so
//! when no chunk is free (after eviction) its pages stay in system memory.
//!
//! **Eviction** (docs/hmm.md "Eviction"): when a migration to VRAM finds
//! no free page, the least recently migrated chunk goes back to system
//! memory through the same `migrate_vma` path, by the VAs its pages back
//! ([`evict`]'s reverse map), and the migration continues. Rules, in order:
//! * a migration evicts only between batches: it finishes (or aborts) the
//!   batch in hand, installs what was copied and drops the mmap lock and
//!   the copier first; eviction then takes the mmap lock of each address
//!   space the chunk's pages belong to (the same one, possibly), one at a
//!   time, and the copier per batch, as any migration does;
//! * it never evicts a chunk filled by itself or by a later migration (no
//!   livelock: what it just migrated stays), and evicts at most every
//!   chunk once, so it ends;
//! * a page whose CPU entry no longer names a page of that chunk (freed,
//!   faulted back, remapped) is skipped;
//! * an address space is held weakly and used with a users reference
//!   (`mmget_not_zero`), so a dying one is skipped, never kept alive.
//!
//! Rules: the copy engine runs one MIGRATE command at a time (the channel's
//! lock is taken per command and never held while calling into the mm;
//! commands of concurrent migrations interleave); a failed copy leaves
//! every page where it was (the migration restores the old entries and the
//! VRAM pages or frames allocated for it go back), except that the frames
//! a MIGRATE that timed out was to write are never given back: the device
//! may still write them. Device pages of this memory must be migrated back
//! before [`DeviceMemory::detach`].

mod evict;

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use faultline_abi::{PhysPage, MAX_MIGRATE_PAGES, PAGE_SIZE};

use super::svm::AttachedMemory;
use super::vram::{VramLeak, VramUsage, CHUNK_BYTES, CHUNK_PAGES};
use super::{
    Channel, Context, DmaRegion, DriverCounters, Gpu, GpuError, MigrateHook, MigrateList, PageSize,
    PageTable, Platform, SvmContext, VramAllocator,
};
use crate::errno::Errno;
use crate::mm::migrate::{
    dev_pagemap_registered, migrate_vma_setup, MigratePfn, MigrateSelect, MigrateSrc,
};
use crate::mm::{
    dev_pagemap_register, dev_pagemap_unregister, mmap_read_lock, mmget_not_zero, mmput,
    DevPagemapOps, DeviceOwner, Mm, MmapReadGuard, PAGE_SHIFT, PMD_SHIFT,
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
    /// Eviction's reverse map and LRU stamps, and the address spaces
    /// served.
    rmap: SpinMutex<evict::Rmap<P>>,
    /// The generation of the latest migration to VRAM.
    generation: AtomicU64,
    inject: SpinMutex<Inject>,
    /// An injection is set: allocations look at `inject`.
    injecting: AtomicBool,
    to_device: AtomicU64,
    by_fault: AtomicU64,
    to_system: AtomicU64,
    cpu_faults: AtomicU64,
    evicted_pages: AtomicU64,
    evicted_chunks: AtomicU64,
    alloc_failures: AtomicU64,
}

/// Driver-side fault injection for VRAM allocation (docs/testing.md "Fault
/// injection"): which of the page allocations of migrations to VRAM fail,
/// counted from [`DeviceMemory::inject_vram_failure`]. A failed allocation
/// leaves its page in system memory and the migration goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VramFailure {
    /// None fail.
    #[default]
    Never,
    /// The `n`th (from 1) fails, once.
    Nth(u64),
    /// Every one after the first `n` fails.
    After(u64),
}

#[derive(Default)]
struct Inject {
    mode: VramFailure,
    /// Allocations since the mode was set.
    seen: u64,
}

impl Inject {
    /// Counts an allocation: whether it is to fail.
    fn fails(&mut self) -> bool {
        if self.mode == VramFailure::Never {
            return false;
        }
        self.seen += 1;
        match self.mode {
            VramFailure::Never => false,
            VramFailure::Nth(n) => self.seen == n,
            VramFailure::After(n) => self.seen > n,
        }
    }
}

/// What a [`DeviceMemory`] did (4 KiB pages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DmemStats {
    /// Pages migrated to VRAM.
    pub to_device: u64,
    /// Of `to_device`, pages a GPU fault migrated
    /// ([`MigratePolicy::FirstTouch`](super::MigratePolicy)).
    pub by_fault: u64,
    /// Pages migrated back by [`DeviceMemory::migrate_to_system`].
    pub to_system: u64,
    /// Pages a CPU fault brought back (`migrate_to_ram`).
    pub cpu_faults: u64,
    /// Pages eviction migrated back to make room.
    pub evicted_pages: u64,
    /// Chunks eviction took pages from.
    pub evicted_chunks: u64,
    /// VRAM allocations that failed by injection ([`VramFailure`]).
    pub alloc_failures: u64,
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
                rmap: SpinMutex::new(evict::Rmap::new(size / CHUNK_BYTES)),
                generation: AtomicU64::new(0),
                inject: SpinMutex::new(Inject::default()),
                injecting: AtomicBool::new(false),
                to_device: AtomicU64::new(0),
                by_fault: AtomicU64::new(0),
                to_system: AtomicU64::new(0),
                cpu_faults: AtomicU64::new(0),
                evicted_pages: AtomicU64::new(0),
                evicted_chunks: AtomicU64::new(0),
                alloc_failures: AtomicU64::new(0),
            }),
        })
    }

    /// The owner id its device-private entries carry.
    pub fn owner(&self) -> DeviceOwner {
        self.inner.owner
    }

    /// Serve `svm`'s address space: register the pagemap there and have
    /// the context map this memory's pages with VRAM leaves (and migrate
    /// to it on fault under `MigratePolicy::FirstTouch`). EBUSY (as
    /// `GpuError::Mm`) if attached already; `NoMemory` if it serves 4,095
    /// live address spaces already.
    pub fn attach<M: Mm>(&self, svm: &SvmContext<P, M>) -> Result<(), GpuError> {
        let d = &*self.inner;
        let ops: Arc<dyn DevPagemapOps<M>> = self.inner.clone();
        dev_pagemap_register(&**svm.mm(), d.owner, ops).map_err(GpuError::Mm)?;
        if d.rmap.lock().add_space(svm.mm()).is_none() {
            dev_pagemap_unregister(&**svm.mm(), d.owner);
            return Err(GpuError::NoMemory);
        }
        svm.set_device_memory(Some(Arc::new(DeviceMemory {
            inner: self.inner.clone(),
        })));
        Ok(())
    }

    /// Stop serving `svm`'s address space (migrate its pages back first).
    pub fn detach<M: Mm>(&self, svm: &SvmContext<P, M>) {
        svm.set_device_memory(None);
        dev_pagemap_unregister(&**svm.mm(), self.inner.owner);
        self.inner.rmap.lock().remove_space(&**svm.mm());
    }

    /// Make VRAM allocations of later migrations to VRAM fail as `f` says
    /// (counting from this call); [`VramFailure::Never`] stops.
    pub fn inject_vram_failure(&self, f: VramFailure) {
        let d = &*self.inner;
        *d.inject.lock() = Inject { mode: f, seen: 0 };
        d.injecting
            .store(f != VramFailure::Never, Ordering::Release);
    }

    /// Migrate the system pages of `[start, end)` (page aligned; holes and
    /// the zero page become zeroed VRAM pages) to VRAM, VMA by VMA. When
    /// VRAM is full it evicts the least recently migrated chunks (never
    /// what this call migrated) and goes on; it stops when nothing is left
    /// to evict. Returns the 4 KiB pages migrated (a 2 MiB page counts
    /// 512). A HUGE VMA's 2 MiB pages go whole, each to a chunk of its own
    /// (there is no 4 KiB fallback: a HUGE VMA maps nothing smaller), and
    /// its part of the range must be 2 MiB aligned. Pages of shared or
    /// inaccessible VMAs stay (0 for a shared mapping), as do pages whose
    /// VRAM allocation failed by injection; the gaps between VMAs are
    /// skipped. A copy error leaves the failing VMA's pages in system
    /// memory and is returned.
    pub fn migrate_to_device<M: Mm>(
        &self,
        svm: &SvmContext<P, M>,
        start: u64,
        end: u64,
    ) -> Result<u64, GpuError> {
        self.to_device(&**svm.mm(), svm.migrate_hook(), start, end)
    }

    /// [`DeviceMemory::migrate_to_device`] of an address space this memory
    /// serves, with its context's migrate hook: the one way to put pages in
    /// VRAM, so that every allocation may evict (the first-touch policy
    /// comes here too, through `AttachedMemory::migrate_on_fault`). The
    /// caller must not hold `mm`'s mmap lock (eviction takes it) nor be
    /// inside another migration.
    fn to_device<M: Mm>(
        &self,
        mm: &M,
        hook: Option<MigrateHook<M>>,
        start: u64,
        end: u64,
    ) -> Result<u64, GpuError> {
        let d = &*self.inner;
        let slot = d.rmap.lock().slot_of(mm).ok_or(GpuError::Invalid(
            "device memory not attached to this context",
        ))?;
        let gen = d.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let mut tried = Vec::new();
        let (mut at, mut total) = (start, 0);
        loop {
            let (n, stop) = d.migrate(
                mm,
                hook.as_ref(),
                at,
                end,
                MigrateSelect::SYSTEM,
                |_, addr, src, huge| d.to_vram(slot, gen, addr, src, huge),
            )?;
            d.to_device.fetch_add(n, Ordering::Relaxed);
            DriverCounters::add(&d.gpu.counters().pages_to_vram, n);
            total += n;
            match stop {
                Some(stop) if d.evict_lru(gen, &mut tried)? => at = stop,
                _ => return Ok(total),
            }
        }
    }

    /// Migrate this memory's pages of `[start, end)` back to system memory.
    /// Returns the 4 KiB pages migrated (a 2 MiB page, which comes back
    /// whole into 512 contiguous frames, counts 512); `NoMemory` if frames
    /// ran out (the pages not copied stay in VRAM).
    pub fn migrate_to_system<M: Mm>(
        &self,
        svm: &SvmContext<P, M>,
        start: u64,
        end: u64,
    ) -> Result<u64, GpuError> {
        let select = MigrateSelect::DEVICE_PRIVATE;
        let (n, stop) = self.inner.migrate(
            &**svm.mm(),
            svm.migrate_hook().as_ref(),
            start,
            end,
            select,
            |mm, _, src, huge| match src {
                MigrateSrc::Page(MigratePfn::Device { .. }) => to_frame(mm, huge),
                _ => Step::Skip,
            },
        )?;
        self.inner.to_system.fetch_add(n, Ordering::Relaxed);
        DriverCounters::add(&self.inner.gpu.counters().pages_to_system, n);
        if stop.is_some() {
            return Err(GpuError::NoMemory);
        }
        Ok(n)
    }

    /// What it did and holds.
    pub fn stats(&self) -> DmemStats {
        let d = &*self.inner;
        DmemStats {
            to_device: d.to_device.load(Ordering::Relaxed),
            by_fault: d.by_fault.load(Ordering::Relaxed),
            to_system: d.to_system.load(Ordering::Relaxed),
            cpu_faults: d.cpu_faults.load(Ordering::Relaxed),
            evicted_pages: d.evicted_pages.load(Ordering::Relaxed),
            evicted_chunks: d.evicted_chunks.load(Ordering::Relaxed),
            alloc_failures: d.alloc_failures.load(Ordering::Relaxed),
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

/// A fresh system frame (`huge`: a run of 512) as a migration's
/// destination ([`Step::Full`] when frames ran out).
fn to_frame<M: Mm>(mm: &M, huge: bool) -> Step {
    let frame = if huge {
        mm.alloc_huge_frame()
    } else {
        mm.alloc_frame()
    };
    match frame {
        Some(pfn) => Step::To(MigratePfn::System { pfn }),
        None => Step::Full,
    }
}

/// A migration page as the copy engine names it.
fn phys(p: MigratePfn) -> PhysPage {
    to_page(p, phys_addr(p))
}

/// The address of a migration page in its aperture.
fn phys_addr(p: MigratePfn) -> u64 {
    match p {
        MigratePfn::System { pfn } => pfn << PAGE_SHIFT,
        MigratePfn::Device { vram_pfn, .. } => vram_pfn << PAGE_SHIFT,
    }
}

/// `addr` in `p`'s aperture.
fn to_page(p: MigratePfn, addr: u64) -> PhysPage {
    match p {
        MigratePfn::System { .. } => PhysPage::system(addr),
        MigratePfn::Device { .. } => PhysPage::vram(addr),
    }
}

/// The parts of `[start, end)` inside VMAs, in order (one VMA lookup per
/// VMA: a gap is stepped over at once). EINVAL if unaligned or empty.
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
        let Some(v) = mm.find_vma(mmap, a).filter(|v| v.start < end) else {
            break;
        };
        let b = v.end.min(end);
        pieces.push((a.max(v.start), b));
        a = b;
    }
    Ok(pieces)
}

impl<P: Platform> Dmem<P> {
    /// One migration of `[start, end)` of `mm`, VMA by VMA: collect what
    /// `select` asks for, a destination per page from `dst` (given the
    /// page's address and contents, and whether it is a HUGE VMA's 2 MiB
    /// page, until it says [`Step::Full`]), one MIGRATE batch, install,
    /// finalize. Returns the 4 KiB pages migrated and,
    /// if `dst` ran out, the address of the page it could not place. Holds
    /// a users reference on `mm` (EFAULT if it is dying) and its mmap lock
    /// for read throughout. `hook` (a test's, [`SvmContext::set_migrate_hook`])
    /// runs once per VMA between collecting the pages and copying them.
    fn migrate<M: Mm>(
        &self,
        mm: &M,
        hook: Option<&MigrateHook<M>>,
        start: u64,
        end: u64,
        select: MigrateSelect,
        dst: impl FnMut(&M, u64, MigrateSrc, bool) -> Step,
    ) -> Result<(u64, Option<u64>), GpuError> {
        if !dev_pagemap_registered(mm, self.owner) {
            return Err(GpuError::Invalid(
                "device memory not attached to this context",
            ));
        }
        if !mmget_not_zero(mm) {
            return Err(GpuError::Mm(Errno::EFAULT));
        }
        let r = self.migrate_locked(&mmap_read_lock(mm), hook, start, end, select, dst);
        mmput(mm);
        r
    }

    fn migrate_locked<M: Mm>(
        &self,
        mmap: &MmapReadGuard<'_, M>,
        hook: Option<&MigrateHook<M>>,
        start: u64,
        end: u64,
        select: MigrateSelect,
        mut dst: impl FnMut(&M, u64, MigrateSrc, bool) -> Step,
    ) -> Result<(u64, Option<u64>), GpuError> {
        let mm = mmap.mm();
        let mut total = 0;
        for (a, b) in vma_pieces(mmap, start, end)? {
            let mut mig =
                migrate_vma_setup(mmap, a, b, select, Some(self.owner)).map_err(GpuError::Mm)?;
            if let Some(hook) = hook {
                hook(mmap, a, b);
            }
            let huge = mig.page_shift() == PMD_SHIFT;
            let unit = 1u64 << (mig.page_shift() - PAGE_SHIFT);
            // Pages of the VMA's size; and 4 KiB copies that zero the
            // destinations of 2 MiB holes from the one zeroed page.
            let mut pairs = Vec::new();
            let mut zeroes = Vec::new();
            let mut dsts = Vec::new();
            let mut stop = None;
            let zero = PhysPage::system(self.zero_phys);
            for (i, p) in mig.pages().iter().enumerate() {
                let to = match dst(mm, mig.addr(i), p.src, huge) {
                    Step::Skip => continue,
                    Step::Full => {
                        stop = Some(mig.addr(i));
                        break;
                    }
                    Step::To(to) => to,
                };
                match p.src {
                    MigrateSrc::Page(from) => pairs.push((phys(from), phys(to))),
                    MigrateSrc::Empty | MigrateSrc::Skip if huge => {
                        let base = phys_addr(to);
                        zeroes.extend((0..unit).map(|k| (zero, to_page(to, base + k * PAGE_SIZE))));
                    }
                    MigrateSrc::Empty | MigrateSrc::Skip => pairs.push((zero, phys(to))),
                }
                dsts.push((i, to));
            }
            let size = if huge {
                PageSize::Size2M
            } else {
                PageSize::Size4K
            };
            let copied = self
                .copy(&pairs, size)
                .and_then(|()| self.copy(&zeroes, PageSize::Size4K));
            if let Err(e) = copied {
                let late = may_still_write(&e);
                for &(_, to) in &dsts {
                    if !(late && matches!(to, MigratePfn::System { .. })) {
                        if huge {
                            to.free_huge(mm);
                        } else {
                            to.free(mm);
                        }
                    }
                }
                return Err(e);
            }
            for &(i, to) in &dsts {
                mig.set_dst(i, to);
            }
            mig.migrate_pages();
            total += mig.finalize() as u64 * unit;
            if stop.is_some() {
                return Ok((total, stop));
            }
        }
        Ok((total, None))
    }

    /// A migration to VRAM's destination for the page at `addr` of the
    /// address space in `slot`: a VRAM page (`huge`: a whole chunk, each of
    /// its pages recorded), recorded for eviction under the migration's
    /// generation `gen`; [`Step::Full`] when none is free; [`Step::Skip`]
    /// for a page already elsewhere or an injected failure.
    fn to_vram(&self, slot: u64, gen: u64, addr: u64, src: MigrateSrc, huge: bool) -> Step {
        match src {
            MigrateSrc::Page(MigratePfn::System { .. }) | MigrateSrc::Empty => {}
            _ => return Step::Skip,
        }
        if self.injecting.load(Ordering::Acquire) && self.inject.lock().fails() {
            self.alloc_failures.fetch_add(1, Ordering::Relaxed);
            return Step::Skip;
        }
        let vram = if huge {
            self.vram.alloc_chunk()
        } else {
            self.vram.alloc_page()
        };
        match vram {
            Some(v) => {
                let mut rmap = self.rmap.lock();
                if huge {
                    rmap.record_chunk(v, slot, addr, gen);
                } else {
                    rmap.record(v, slot, addr, gen);
                }
                drop(rmap);
                Step::To(MigratePfn::Device {
                    owner: self.owner,
                    vram_pfn: (self.base + v) >> PAGE_SHIFT,
                })
            }
            None => Step::Full,
        }
    }

    /// Evict the least recently migrated chunk that the migration of
    /// generation `gen` may take (not one it filled, not one in `tried`,
    /// which it joins): migrate its pages back to system memory. Whether
    /// a page moved (if not from the first candidate, from the next).
    /// Called with no mmap lock and no copier held.
    fn evict_lru(&self, gen: u64, tried: &mut Vec<u32>) -> Result<bool, GpuError> {
        loop {
            let (c, spaces) = {
                let rmap = self.rmap.lock();
                let Some(c) = rmap.victim(gen, tried) else {
                    return Ok(false);
                };
                (c, rmap.pages_of(c))
            };
            tried.push(c);
            let chunk = self.base + u64::from(c) * CHUNK_BYTES;
            let mut moved = 0;
            for (space, vas) in spaces {
                moved += space.evict(self, &vas, chunk)?;
            }
            if moved > 0 {
                self.evicted_pages.fetch_add(moved, Ordering::Relaxed);
                self.evicted_chunks.fetch_add(1, Ordering::Relaxed);
                let counters = self.gpu.counters();
                DriverCounters::add(&counters.pages_evicted, moved);
                DriverCounters::add(&counters.chunks_evicted, 1);
                return Ok(true);
            }
        }
    }

    /// One MIGRATE batch of pages of `size` (4 KiB or 2 MiB; nothing for
    /// none), in commands of up to `MAX_MIGRATE_PAGES`.
    fn copy(&self, pairs: &[(PhysPage, PhysPage)], size: PageSize) -> Result<(), GpuError> {
        // The copier is taken per MIGRATE command, not per batch: a CPU
        // fault's one-page `migrate_to_ram` waits for one command at most,
        // not for a whole migration.
        for command in pairs.chunks(MAX_MIGRATE_PAGES as usize) {
            let mut c = self.copier.lock();
            let Copier { chan, list, .. } = &mut *c;
            list.run(chan, command, size)?;
        }
        Ok(())
    }

    /// Give back the VRAM pages (with `chunk`, the whole chunks) of
    /// `vram_pfns`, their reverse-map entries in one round of its lock.
    fn free_vram(&self, vram_pfns: &[u64], chunk: bool) {
        let mut freed = Vec::with_capacity(vram_pfns.len());
        for &pfn in vram_pfns {
            let v = pfn << PAGE_SHIFT;
            let r = v
                .checked_sub(self.base)
                .ok_or(GpuError::Invalid("not this memory's VRAM"))
                .and_then(|o| {
                    let done = if chunk {
                        self.vram.free_chunk(o)
                    } else {
                        self.vram.free_page(o)
                    };
                    done.map(|()| o)
                });
            match r {
                Ok(o) => freed.push(o),
                Err(e) => log::error!("dmem: VRAM page {v:#x}: {e}"),
            }
        }
        let mut rmap = self.rmap.lock();
        for o in freed {
            if chunk {
                rmap.forget_chunk(o);
            } else {
                rmap.forget(o);
            }
        }
    }

    /// `migrate_to_ram` of a page of `size` (4 KiB or 2 MiB).
    fn to_ram(&self, vram_pfn: u64, dst_pfn: u64, size: PageSize) -> Result<(), Errno> {
        let owner = self.owner;
        let pair = (
            phys(MigratePfn::Device { owner, vram_pfn }),
            phys(MigratePfn::System { pfn: dst_pfn }),
        );
        self.copy(&[pair], size).map_err(|e| {
            log::warn!("dmem: migrate_to_ram of VRAM page {vram_pfn:#x}: {e}");
            if may_still_write(&e) {
                Errno::EBUSY
            } else {
                Errno::EFAULT
            }
        })?;
        let pages = match size {
            PageSize::Size2M => CHUNK_PAGES,
            _ => 1,
        };
        self.cpu_faults.fetch_add(pages, Ordering::Relaxed);
        DriverCounters::add(&self.gpu.counters().pages_cpu_faulted_back, pages);
        Ok(())
    }
}

impl<P: Platform, M: Mm> AttachedMemory<M> for DeviceMemory<P> {
    fn owner(&self) -> DeviceOwner {
        self.inner.owner
    }

    fn migrate_on_fault(
        &self,
        mm: &Arc<M>,
        hook: Option<MigrateHook<M>>,
        start: u64,
        end: u64,
    ) -> Result<u64, GpuError> {
        let n = self.to_device(&**mm, hook, start, end)?;
        self.inner.by_fault.fetch_add(n, Ordering::Relaxed);
        DriverCounters::add(&self.inner.gpu.counters().pages_to_vram_by_fault, n);
        Ok(n)
    }
}

impl<P: Platform, M: Mm> DevPagemapOps<M> for Dmem<P> {
    fn migrate_to_ram(
        &self,
        _mm: &M,
        _addr: u64,
        vram_pfn: u64,
        dst_pfn: u64,
        huge: bool,
    ) -> Result<(), Errno> {
        let size = if huge {
            PageSize::Size2M
        } else {
            PageSize::Size4K
        };
        self.to_ram(vram_pfn, dst_pfn, size)
    }

    fn page_free(&self, vram_pfn: u64, huge: bool) {
        self.free_vram(&[vram_pfn], huge);
    }

    fn pages_free(&self, vram_pfns: &[u64], huge: bool) {
        self.free_vram(vram_pfns, huge);
    }
}

impl<P: Platform> Drop for Dmem<P> {
    fn drop(&mut self) {
        if let Some(zero) = self.zero.take() {
            self.platform.dma_free(zero);
        }
    }
}
