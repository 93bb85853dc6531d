//! Device-private pages and their migration (Linux's `MEMORY_DEVICE_PRIVATE`
//! `dev_pagemap` and `mm/migrate_device.c`), generic over [`Mm`].
//!
//! A device registers its memory on an address space as a *pagemap*
//! ([`dev_pagemap_register`]): an owner id ([`DeviceOwner`], the same for
//! every address space the device serves) and its [`DevPagemapOps`]. A page
//! of that memory is mapped by a [`PageState::DevicePrivate`] entry naming
//! the owner and the device's page; the CPU cannot use it, so a CPU fault on
//! it brings the page back through the owner's `migrate_to_ram`.
//!
//! Migration takes the three steps of Linux ≥ 5.4: [`migrate_vma_setup`]
//! (collect the pages of a range and unmap them: a migration entry in each
//! PTE, announced as [`MmuNotifyEvent::Migrate`]), the caller's copy, then
//! [`MigrateVma::migrate_pages`] (install the new pages) and
//! [`MigrateVma::finalize`] (restore what was not migrated, free what was
//! replaced). Dropping a [`MigrateVma`] finalizes it, so an early return
//! restores every page.
//!
//! Ordering rules:
//! * the mmap lock is held for read from setup to finalize (the
//!   [`MigrateVma`] borrows the guard): munmap and mprotect cannot run in
//!   between;
//! * a page is unmapped (its migration entry installed) between the
//!   notifier's start and end, before anything reads its contents, so no
//!   device translation of it survives the copy;
//! * the migration entry is the page lock: whoever installed it owns the
//!   page until finalize; a fault on it waits ([`migration_entry_wait`]) and
//!   a second migration skips it;
//! * old frames and device pages are freed only in finalize, after the new
//!   entries are in, and never while a page-table lock is held.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU16, Ordering};

use bitflags::bitflags;

use super::{
    mmu_notifier_invalidate_range_end, mmu_notifier_invalidate_range_start, FaultError, FaultFlags,
    Mm, MmapReadGuard, MmuNotifierRange, MmuNotifyEvent, PageState, PteSwap, VmFlags, PAGE_SHIFT,
    PAGE_SIZE, PMD_SHIFT, PMD_SIZE,
};
use crate::errno::Errno;

/// A device memory's owner id, as a device-private entry names it. The same
/// for every address space (a device allocates one with
/// [`DeviceOwner::alloc`] and registers it on each address space it
/// mirrors). Ids are 1 ..= [`DeviceOwner::MAX`], so that an x86 PTE has room
/// for one beside the page number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceOwner(u16);

/// Source of [`DeviceOwner`] ids.
static NEXT_OWNER: AtomicU16 = AtomicU16::new(1);

impl DeviceOwner {
    /// The largest id: what a CPU entry holds ([`CpuDevicePrivate`], the
    /// encoding the device's coherence checker reads).
    ///
    /// [`CpuDevicePrivate`]: faultline_abi::CpuDevicePrivate
    pub const MAX: u16 = faultline_abi::CpuDevicePrivate::OWNER_MAX;

    /// A fresh id, `None` once all are taken (ids are not reused: an entry
    /// naming a device that went away must never name another).
    pub fn alloc() -> Option<DeviceOwner> {
        NEXT_OWNER
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n <= Self::MAX).then_some(n + 1)
            })
            .ok()
            .map(DeviceOwner)
    }

    /// The id as stored in a page-table entry.
    pub fn get(self) -> u16 {
        self.0
    }

    /// The owner an entry stores, `None` for 0 or an id above
    /// [`DeviceOwner::MAX`].
    pub fn from_raw(id: u16) -> Option<DeviceOwner> {
        (1..=Self::MAX).contains(&id).then_some(DeviceOwner(id))
    }
}

/// A device memory's callbacks (Linux's `struct dev_pagemap_ops`).
pub trait DevPagemapOps<M: Mm>: Send + Sync {
    /// The CPU touched a page of this memory: copy device page `vram_pfn`
    /// (mapped at `addr`) into the system frame `dst_pfn`, which the mm
    /// allocated and installs when this returns `Ok` (then it frees the
    /// device page through [`page_free`](Self::page_free)). `huge`: a 2 MiB
    /// device page, the 512 device pages from `vram_pfn` into the 512
    /// frames from `dst_pfn` (a run from [`Mm::alloc_huge_frame`]), all or
    /// nothing. Runs with the mmap lock held for read and the page locked
    /// by its migration entry; must not take the mmap lock for write. An
    /// error leaves the page in device memory and the access fails
    /// (`Sigbus`); `EBUSY` says the copy may still write `dst_pfn` later
    /// (the device did not answer in time), so the mm never gives that
    /// frame back.
    fn migrate_to_ram(
        &self,
        mm: &M,
        addr: u64,
        vram_pfn: u64,
        dst_pfn: u64,
        huge: bool,
    ) -> Result<(), Errno>;

    /// No page table maps device page `vram_pfn` (`huge`: the 2 MiB device
    /// page of the 512 pages from it) any more (munmap, exit, or its
    /// migration finished): give it back. Called without any mm lock.
    fn page_free(&self, vram_pfn: u64, huge: bool);

    /// [`page_free`](Self::page_free) of each of `vram_pfns`: a
    /// migration's finalize gives back a whole range's device pages at
    /// once. The default frees one by one.
    fn pages_free(&self, vram_pfns: &[u64], huge: bool) {
        for &p in vram_pfns {
            self.page_free(p, huge);
        }
    }
}

/// Register `owner`'s memory on `mm` (each address space that may map its
/// pages). EBUSY if `owner` is registered already.
pub fn dev_pagemap_register<M: Mm>(
    mm: &M,
    owner: DeviceOwner,
    ops: Arc<dyn DevPagemapOps<M>>,
) -> Result<(), Errno> {
    let mut maps = mm.core().pagemaps.write();
    if maps.iter().any(|(o, _)| *o == owner) {
        return Err(Errno::EBUSY);
    }
    maps.push((owner, ops));
    Ok(())
}

/// Forget `owner`'s memory on `mm`. Its device-private entries must be gone
/// first (migrated back): a CPU fault on one left behind is a `Sigbus`, and
/// unmapping it frees nothing.
pub fn dev_pagemap_unregister<M: Mm>(mm: &M, owner: DeviceOwner) {
    mm.core().pagemaps.write().retain(|(o, _)| *o != owner);
}

/// Whether `owner`'s memory is registered on `mm`.
pub fn dev_pagemap_registered<M: Mm>(mm: &M, owner: DeviceOwner) -> bool {
    pagemap(mm, owner).is_some()
}

/// The registered pagemaps of an address space, by owner.
pub(crate) type Pagemaps<M> = Vec<(DeviceOwner, Arc<dyn DevPagemapOps<M>>)>;

fn pagemap<M: Mm>(mm: &M, owner: DeviceOwner) -> Option<Arc<dyn DevPagemapOps<M>>> {
    mm.core()
        .pagemaps
        .read()
        .iter()
        .find(|(o, _)| *o == owner)
        .map(|(_, ops)| Arc::clone(ops))
}

/// An implementation removed a device-private entry (munmap, exit): the
/// owner's `page_free`. Call it after
/// `invalidate_range_end`, with no mm lock held.
pub fn device_page_free<M: Mm>(mm: &M, owner: DeviceOwner, vram_pfn: u64, huge: bool) {
    match pagemap(mm, owner) {
        Some(ops) => ops.page_free(vram_pfn, huge),
        None => log::warn!(
            "mm: device page {vram_pfn:#x} of unregistered owner {} unmapped",
            owner.get()
        ),
    }
}

bitflags! {
    /// Which pages [`migrate_vma_setup`] collects (`MIGRATE_VMA_SELECT_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct MigrateSelect: u32 {
        /// System memory: present pages, the zero page and holes.
        const SYSTEM = 1 << 0;
        /// Device-private pages of the migration's owner.
        const DEVICE_PRIVATE = 1 << 1;
    }
}

/// A page a migration moves from or to: a system frame or a device page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigratePfn {
    /// A system frame (a destination comes from [`Mm::alloc_frame`]).
    System {
        /// Its frame number.
        pfn: u64,
    },
    /// A device page; its owner must be registered on the address space.
    Device {
        /// Its device.
        owner: DeviceOwner,
        /// Its page in device memory.
        vram_pfn: u64,
    },
}

impl MigratePfn {
    /// The entry that maps it: a PTE, or for a 2 MiB page (`huge`) a PMD.
    fn entry(self, writable: bool, huge: bool) -> PageState {
        match self {
            MigratePfn::System { pfn } if huge => PageState::Huge { pfn, writable },
            MigratePfn::System { pfn } => PageState::Present { pfn, writable },
            MigratePfn::Device { owner, vram_pfn } => PageState::DevicePrivate {
                owner,
                vram_pfn,
                writable,
                huge,
            },
        }
    }

    /// Give a 4 KiB page back: to the mm's frames or to its owner's
    /// `page_free` (a destination allocated for a migration that will not
    /// use it).
    pub fn free<M: Mm>(self, mm: &M) {
        self.release(mm, false);
    }

    /// [`MigratePfn::free`] for a 2 MiB page (a run of frames from
    /// [`Mm::alloc_huge_frame`], or a 2 MiB device page).
    pub fn free_huge<M: Mm>(self, mm: &M) {
        self.release(mm, true);
    }

    fn release<M: Mm>(self, mm: &M, huge: bool) {
        match self {
            MigratePfn::System { pfn } if huge => mm.free_huge_frame(pfn),
            MigratePfn::System { pfn } => mm.free_frame(pfn),
            MigratePfn::Device { owner, vram_pfn } => device_page_free(mm, owner, vram_pfn, huge),
        }
    }
}

/// What a page held when it was collected (Linux's `src[]` entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrateSrc {
    /// Not collected: not selected, locked by another migration, special,
    /// or the VMA cannot migrate (shared, no read access).
    Skip,
    /// A hole or the zero page: no data; the destination must be zeroed.
    Empty,
    /// A system frame or a device page, with data.
    Page(MigratePfn),
}

/// One page of a migration (of [`MigrateVma::page_shift`]: 4 KiB, or
/// 2 MiB in a HUGE VMA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigratePage {
    /// What it held (read only for the caller).
    pub src: MigrateSrc,
    /// Whether the new entry may be written (the old one could be, or the
    /// VMA is writable for a hole or the zero page).
    pub writable: bool,
    /// Where it goes (Linux's `dst[]` entry): the caller's choice, set
    /// with [`MigrateVma::set_dst`] before [`MigrateVma::migrate_pages`];
    /// `None` keeps the page where it was. A destination that cannot be
    /// installed is freed by finalize.
    pub dst: Option<MigratePfn>,
    /// The entry the migration entry replaced.
    old: PageState,
    /// [`MigrateVma::pages`] installed `dst`.
    installed: bool,
}

/// A migration in progress (Linux's `struct migrate_vma`), from
/// [`migrate_vma_setup`] to [`MigrateVma::finalize`] (or its drop).
pub struct MigrateVma<'g, 'm, M: Mm> {
    mmap: &'g MmapReadGuard<'m, M>,
    start: u64,
    /// log2 of every page's size: [`PAGE_SHIFT`], or [`PMD_SHIFT`] in a
    /// HUGE VMA (its pages move as 2 MiB units, PMD entries).
    shift: u32,
    pages: Vec<MigratePage>,
    collected: usize,
    finalized: bool,
}

/// `migrate_vma_setup`: collect the pages of `[start, end)` that `select`
/// asks for, unmap them from the CPU (a migration entry in each PTE,
/// between `invalidate_range_start` and `_end` of event
/// [`MmuNotifyEvent::Migrate`] naming `owner`) and return the migration.
/// Device-private pages are collected only if they belong to `owner`.
///
/// In a HUGE VMA the pages are its 2 MiB leaves, collected whole (Linux ≥
/// 6.15's `MIGRATE_VMA_SELECT_COMPOUND`): one PMD migration entry each,
/// and the destination must be 2 MiB too ([`MigrateVma::page_shift`]);
/// `[start, end)` must then be 2 MiB aligned (EINVAL). A 4 KiB VMA's
/// pages stay 4 KiB.
///
/// The range must lie inside one VMA (EINVAL otherwise, or if unaligned or
/// empty); special VMAs are EINVAL. Pages of a shared VMA (migrating
/// shared anonymous memory would give each sharer its own copy) or of a
/// VMA without read access are not collected (`Skip`), nor are frames
/// other PTEs map too ([`Mm::frame_shared`]: copy-on-write after a fork).
/// Holes and the zero page are collected as `Empty`: a migration to the
/// device allocates them there, zeroed.
pub fn migrate_vma_setup<'g, 'm, M: Mm>(
    mmap: &'g MmapReadGuard<'m, M>,
    start: u64,
    end: u64,
    select: MigrateSelect,
    owner: Option<DeviceOwner>,
) -> Result<MigrateVma<'g, 'm, M>, Errno> {
    let mm = mmap.mm();
    let vma = mm.vma_lookup(mmap, start).ok_or(Errno::EINVAL)?;
    let shift = if vma.flags.contains(VmFlags::HUGE) {
        PMD_SHIFT
    } else {
        PAGE_SHIFT
    };
    let size = 1u64 << shift;
    if start >= end || !start.is_multiple_of(size) || !end.is_multiple_of(size) {
        return Err(Errno::EINVAL);
    }
    if end > vma.end || vma.flags.intersects(VmFlags::SPECIAL_KINDS) {
        return Err(Errno::EINVAL);
    }
    let npages = ((end - start) >> shift) as usize;
    let skip = MigratePage {
        src: MigrateSrc::Skip,
        writable: false,
        dst: None,
        old: PageState::None,
        installed: false,
    };
    let mut mig = MigrateVma {
        mmap,
        start,
        shift,
        pages: alloc::vec![skip; npages],
        collected: 0,
        finalized: false,
    };
    let huge = shift == PMD_SHIFT;
    let movable = vma.flags.contains(VmFlags::READ) && !vma.flags.contains(VmFlags::SHARED);
    if !movable {
        return Ok(mig);
    }
    let vma_write = vma.flags.contains(VmFlags::WRITE);
    let r = MmuNotifierRange {
        start,
        end,
        event: MmuNotifyEvent::Migrate { owner },
        blockable: true,
    };
    mmu_notifier_invalidate_range_start(mm, &r).expect("blockable");
    let system = select.contains(MigrateSelect::SYSTEM);
    let states = page_states(mmap, start, shift, npages);
    // (page, what it holds, writable) for each page to lock, and the
    // exchange that locks it.
    let mut found = Vec::new();
    let mut swaps = Vec::new();
    for (i, &old) in states.iter().enumerate() {
        let (src, writable) = match old {
            PageState::None if system => (MigrateSrc::Empty, vma_write),
            PageState::Zero { .. } if system && !huge => (MigrateSrc::Empty, vma_write),
            PageState::Present { pfn, writable } if system && !huge && !mm.frame_shared(pfn) => {
                (MigrateSrc::Page(MigratePfn::System { pfn }), writable)
            }
            PageState::Huge { pfn, writable } if system && huge && !mm.frame_shared(pfn) => {
                (MigrateSrc::Page(MigratePfn::System { pfn }), writable)
            }
            PageState::DevicePrivate {
                owner: o,
                vram_pfn,
                writable,
                huge: h,
            } if select.contains(MigrateSelect::DEVICE_PRIVATE)
                && Some(o) == owner
                && h == huge =>
            {
                let src = MigratePfn::Device { owner: o, vram_pfn };
                (MigrateSrc::Page(src), writable)
            }
            _ => continue,
        };
        found.push((src, writable));
        swaps.push((i, old, PageState::Migration));
    }
    let done = exchange(mmap, start, shift, &swaps);
    for ((&(i, old, _), (src, writable)), r) in swaps.iter().zip(found).zip(done) {
        if r.is_ok() {
            mig.pages[i] = MigratePage {
                src,
                writable,
                dst: None,
                old,
                installed: false,
            };
            mig.collected += 1;
        }
    }
    mmu_notifier_invalidate_range_end(mm, &r);
    Ok(mig)
}

/// The states of the `n` pages of size `1 << shift` from `start` on: for
/// 4 KiB pages one last-level table read per 2 MiB block
/// ([`Mm::walk_ptes`]) or one walk for a block answered at block level
/// (no page table), where a walk per page costs a few hundred emulated
/// instructions in the guest.
fn page_states<M: Mm>(
    mmap: &MmapReadGuard<'_, M>,
    start: u64,
    shift: u32,
    n: usize,
) -> Vec<PageState> {
    let mm = mmap.mm();
    let mut out = alloc::vec![PageState::None; n];
    let mut i = 0;
    while i < n {
        let addr = start + ((i as u64) << shift);
        if shift != PAGE_SHIFT {
            out[i] = mm.walk(mmap, addr).state;
            i += 1;
            continue;
        }
        let in_block = ((PMD_SIZE - (addr & (PMD_SIZE - 1))) >> PAGE_SHIFT) as usize;
        let run = in_block.min(n - i);
        let got = mm.walk_ptes(mmap, addr, &mut out[i..i + run]).min(run);
        if got > 0 {
            i += got;
            continue;
        }
        let w = mm.walk(mmap, addr);
        let k = if w.shift >= PMD_SHIFT { run } else { 1 };
        out[i..i + k].fill(w.state);
        i += k;
    }
    out
}

/// The compare-and-exchanges `(page index, old, new)` of a migration's
/// entries, in index order, and each one's result: the PTEs in one
/// [`Mm::pte_exchange_run`], a HUGE VMA's PMDs one by one.
fn exchange<M: Mm>(
    mmap: &MmapReadGuard<'_, M>,
    start: u64,
    shift: u32,
    swaps: &[(usize, PageState, PageState)],
) -> Vec<Result<(), PageState>> {
    let mm = mmap.mm();
    let addr = |i: usize| start + ((i as u64) << shift);
    if shift == PMD_SHIFT {
        return swaps
            .iter()
            .map(|&(i, old, new)| mm.pmd_exchange(mmap, addr(i), old, new))
            .collect();
    }
    let run: Vec<PteSwap> = swaps
        .iter()
        .map(|&(i, old, new)| PteSwap {
            addr: addr(i),
            old,
            new,
        })
        .collect();
    let mut done = alloc::vec![Ok(()); run.len()];
    mm.pte_exchange_run(mmap, &run, &mut done);
    done
}

impl<M: Mm> MigrateVma<'_, '_, M> {
    /// The pages, in address order from the range's start.
    pub fn pages(&self) -> &[MigratePage] {
        &self.pages
    }

    /// Set where page `i` goes (before [`MigrateVma::migrate_pages`]).
    /// Ignored for a page that was not collected.
    pub fn set_dst(&mut self, i: usize, dst: MigratePfn) {
        if let Some(p) = self.pages.get_mut(i) {
            if p.src != MigrateSrc::Skip && !p.installed {
                p.dst = Some(dst);
            }
        }
    }

    /// Pages collected (Linux's `cpages`).
    pub fn collected(&self) -> usize {
        self.collected
    }

    /// log2 of the size of its pages: [`PAGE_SHIFT`], or [`PMD_SHIFT`]
    /// for a HUGE VMA's (sources and destinations are then 2 MiB pages:
    /// runs of 512 frames, 2 MiB device pages).
    pub fn page_shift(&self) -> u32 {
        self.shift
    }

    /// The address of page `i`.
    pub fn addr(&self, i: usize) -> u64 {
        self.start + ((i as u64) << self.shift)
    }

    /// `migrate_vma_pages`: install every collected page's destination in
    /// place of its migration entry; the CPU (or, for a device page, its
    /// device through HMM) sees the new page from here on. Returns how many
    /// were installed. A page whose migration entry is gone (an `Mm` that
    /// reclaims without the mmap lock) is not installed.
    pub fn migrate_pages(&mut self) -> usize {
        let huge = self.shift == PMD_SHIFT;
        let swaps: Vec<_> = (self.pages.iter().enumerate())
            .filter_map(|(i, p)| {
                let dst = p.dst.filter(|_| !p.installed)?;
                Some((i, PageState::Migration, dst.entry(p.writable, huge)))
            })
            .collect();
        let done = exchange(self.mmap, self.start, self.shift, &swaps);
        let mut n = 0;
        for (&(i, ..), r) in swaps.iter().zip(done) {
            if r.is_ok() {
                self.pages[i].installed = true;
                n += 1;
            }
        }
        n
    }

    /// `migrate_vma_finalize`: put the old entry back for every collected
    /// page that was not installed, free the old frame or device page of
    /// every page that was, and free destinations that were not used.
    /// Returns how many pages migrated. Idempotent; dropping the migration
    /// does it too.
    pub fn finalize(&mut self) -> usize {
        if self.finalized {
            return self.pages.iter().filter(|p| p.installed).count();
        }
        self.finalized = true;
        let mm = self.mmap.mm();
        let huge = self.shift == PMD_SHIFT;
        let mut migrated = 0;
        // Freed after every entry is back (frees may call into drivers).
        let mut free: Vec<MigratePfn> = Vec::new();
        let mut restore = Vec::new();
        for (i, p) in self.pages.iter().enumerate() {
            let old = match p.src {
                MigrateSrc::Skip => continue,
                MigrateSrc::Empty => None,
                MigrateSrc::Page(old) => Some(old),
            };
            if p.installed {
                migrated += 1;
                free.extend(old);
                continue;
            }
            free.extend(p.dst);
            restore.push((i, PageState::Migration, p.old));
        }
        let done = exchange(self.mmap, self.start, self.shift, &restore);
        for (&(i, ..), r) in restore.iter().zip(done) {
            if let (Err(_), MigrateSrc::Page(old)) = (r, self.pages[i].src) {
                // The entry went away under us (reclaim without the mmap
                // lock): the old contents are ours to free.
                free.push(old);
            }
        }
        release_all(mm, &free, huge);
        migrated
    }
}

/// Gives back a finalize's pages (`huge`: 2 MiB ones): frames one by one,
/// device pages in one [`DevPagemapOps::pages_free`] per owner (one
/// pagemap lookup, one round of the owner's locks).
fn release_all<M: Mm>(mm: &M, pages: &[MigratePfn], huge: bool) {
    let mut device: Vec<(DeviceOwner, u64)> = Vec::new();
    for &p in pages {
        match p {
            MigratePfn::Device { owner, vram_pfn } => device.push((owner, vram_pfn)),
            system => system.release(mm, huge),
        }
    }
    while let Some(&(owner, _)) = device.first() {
        let pfns: Vec<u64> = (device.iter().filter(|(o, _)| *o == owner))
            .map(|&(_, p)| p)
            .collect();
        device.retain(|(o, _)| *o != owner);
        match pagemap(mm, owner) {
            Some(ops) => ops.pages_free(&pfns, huge),
            None => log::warn!(
                "mm: {} device pages of unregistered owner {} unmapped",
                pfns.len(),
                owner.get()
            ),
        }
    }
}

impl<M: Mm> Drop for MigrateVma<'_, '_, M> {
    fn drop(&mut self) {
        self.finalize();
    }
}

/// How long a fault waits for another migration of its page before it
/// gives up (`Sigbus`): a migration holds its page for one copy, so this
/// only fires when the migrating thread cannot run (it is the one waiting).
const MIGRATION_WAIT_NS: u64 = 1_000_000_000;

/// A fault found a migration entry at `addr`: wait until the migration
/// that owns the page is done (Linux's `migration_entry_wait`), then let
/// the caller walk again. With [`FaultFlags::ALLOW_RETRY`] it does not wait
/// (`Retry`); a wait longer than a second is `Sigbus`, never a hang.
pub fn migration_entry_wait<M: Mm>(
    mmap: &MmapReadGuard<'_, M>,
    addr: u64,
    flags: FaultFlags,
) -> Result<(), FaultError> {
    if flags.contains(FaultFlags::ALLOW_RETRY) {
        return Err(FaultError::Retry);
    }
    let mm = mmap.mm();
    let deadline = mm.now_ns().saturating_add(MIGRATION_WAIT_NS);
    while mm.walk(mmap, addr).state == PageState::Migration {
        if mm.now_ns() >= deadline {
            log::warn!("mm: migration of {addr:#x} did not finish in time");
            return Err(FaultError::Sigbus);
        }
        mm.cpu_relax();
    }
    Ok(())
}

/// A fault on a device-private entry at `addr` (Linux's `do_swap_page` →
/// `migrate_to_ram`): lock the page with a migration entry, have its owner
/// copy it into a fresh frame, install the frame and free the device page.
/// A 2 MiB device page comes back whole, into a run of 512 frames from
/// [`Mm::alloc_huge_frame`] (a HUGE VMA maps nothing smaller). If another
/// fault holds the page it waits for that one instead. Errors: `Sigbus`
/// (owner not registered or its copy failed; the page stays on the
/// device), `Oom` (no frame, or no free 2 MiB run). Called by an `Mm`'s
/// `handle_mm_fault` with its page-table lock released.
pub fn device_private_fault<M: Mm>(
    mmap: &MmapReadGuard<'_, M>,
    addr: u64,
    flags: FaultFlags,
) -> Result<(), FaultError> {
    let mm = mmap.mm();
    let page = addr & !(PAGE_SIZE - 1);
    let (owner, huge) = match mm.walk(mmap, page).state {
        PageState::DevicePrivate { owner, huge, .. } => (owner, huge),
        PageState::Migration => return migration_entry_wait(mmap, page, flags),
        // Resolved meanwhile: the caller walks again.
        _ => return Ok(()),
    };
    let page = if huge { addr & !(PMD_SIZE - 1) } else { page };
    let size = if huge { PMD_SIZE } else { PAGE_SIZE };
    let ops = pagemap(mm, owner).ok_or(FaultError::Sigbus)?;
    let mut mig = migrate_vma_setup(
        mmap,
        page,
        page + size,
        MigrateSelect::DEVICE_PRIVATE,
        Some(owner),
    )
    .map_err(|_| FaultError::Sigbus)?;
    let MigrateSrc::Page(MigratePfn::Device { vram_pfn, .. }) = mig.pages()[0].src else {
        // Another fault or migration locked it first.
        drop(mig);
        return migration_entry_wait(mmap, page, flags);
    };
    let frame = if huge {
        mm.alloc_huge_frame()
    } else {
        mm.alloc_frame()
    };
    let frame = frame.ok_or(FaultError::Oom)?;
    let copied = ops.migrate_to_ram(mm, page, vram_pfn, frame, huge);
    let dst = MigratePfn::System { pfn: frame };
    if let Err(e) = copied {
        log::warn!("mm: migrate_to_ram of {page:#x} failed: {e}");
        if e != Errno::EBUSY {
            dst.release(mm, huge);
        }
        return Err(FaultError::Sigbus);
    }
    mig.set_dst(0, dst);
    mig.migrate_pages();
    mig.finalize();
    Ok(())
}

#[cfg(test)]
mod tests;
