//! The address-space interface the mirror layer needs: the part of Linux's
//! `mm_struct` / `vm_area_struct` / page-table walker / fault handler /
//! mmu-notifier chain that HMM touches, as a trait.
//!
//! The firmware implements [`Mm`] with real x86-64 page tables; the host tests
//! and the bench implement it with the simulated address space in
//! [`crate::sim`]. Everything else in this module is generic glue that every
//! implementation shares, so the reference-count and notifier rules are written
//! (and tested) once:
//!
//! * the *users* count (`mmget` / `mmget_not_zero` / `mmput`): the last
//!   `mmput` runs the release notifiers and then [`Mm::exit_mmap`];
//! * the *structure* count (`mmgrab` / `mmdrop`): an `Arc<M>`;
//! * the mmap lock, whose read guard [`MmapReadGuard`] is the proof that HMM's
//!   walk and fault entry points demand (it can only be obtained by locking);
//! * the mmu-notifier chain ([`MmuNotifier`], [`mmu_notifier_invalidate_range_start`] …),
//!   which the implementation calls around every change to its page tables.

use alloc::sync::{Arc, Weak};
use alloc::vec::Vec;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bitflags::bitflags;
use faultline_abi::{level_shift, LEAF_2M};
use lock_api::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::errno::Errno;
use crate::hmm::Hmm;

pub mod exclusive;
pub mod fork;
pub mod migrate;

pub use exclusive::{exclusive_entry_restore, make_device_exclusive};
pub use migrate::{
    dev_pagemap_register, dev_pagemap_unregister, device_page_free, DevPagemapOps, DeviceOwner,
};

/// The base page (4 KiB): one size for the CPU side, the device and the
/// mirror between them, defined once in the hardware interface.
pub use faultline_abi::{PAGE_SHIFT, PAGE_SIZE};
/// log2 of a PMD-level (huge) leaf: the device's level-2 leaf.
pub const PMD_SHIFT: u32 = level_shift(2);
/// Size of a PMD-level (huge) leaf (2 MiB).
pub const PMD_SIZE: u64 = LEAF_2M;

bitflags! {
    /// `vm_flags`, the subset HMM looks at.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct VmFlags: u32 {
        /// `VM_READ`: without it HMM answers EPERM (HMM, like Linux, does not
        /// support write-without-read).
        const READ = 1 << 0;
        /// `VM_WRITE`: a write request on a VMA without it is EPERM.
        const WRITE = 1 << 1;
        /// `VM_EXEC`: carried for completeness; HMM ignores it.
        const EXEC = 1 << 2;
        /// `VM_SHARED`: informational.
        const SHARED = 1 << 3;
        /// `VM_IO`: device memory; HMM refuses it (EFAULT).
        const IO = 1 << 4;
        /// `VM_PFNMAP`: raw pfns without `struct page`; HMM refuses it (EFAULT).
        const PFNMAP = 1 << 5;
        /// `VM_MIXEDMAP`: HMM refuses it (EFAULT).
        const MIXEDMAP = 1 << 6;
        /// Every page in this VMA is a 2 MiB leaf (Linux: a hugetlb VMA). Only
        /// such VMAs accept ranges with `page_shift == PMD_SHIFT`. Start and
        /// end of such a VMA must be 2 MiB aligned.
        const HUGE = 1 << 7;
    }
}

impl VmFlags {
    /// The kinds HMM treats as "special": not backed by ordinary pages.
    pub const SPECIAL_KINDS: VmFlags = VmFlags::IO.union(VmFlags::PFNMAP).union(VmFlags::MIXEDMAP);
}

/// A virtual memory area: `[start, end)` with its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vma {
    /// First byte (page aligned).
    pub start: u64,
    /// One past the last byte (page aligned).
    pub end: u64,
    /// Permissions and kind.
    pub flags: VmFlags,
}

impl Vma {
    /// Whether `addr` lies in `[start, end)`.
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
}

/// Whether changing `[start, end)` would split one of `vmas`' 2 MiB
/// ([`VmFlags::HUGE`]) VMAs off a 2 MiB boundary: a 2 MiB page cannot be
/// cut, so munmap, mprotect and madvise answer EINVAL instead.
pub fn splits_huge<'a>(vmas: impl IntoIterator<Item = &'a Vma>, start: u64, end: u64) -> bool {
    vmas.into_iter().any(|v| {
        v.flags.contains(VmFlags::HUGE)
            && v.start < end
            && start < v.end
            && ((v.start < start && !start.is_multiple_of(PMD_SIZE))
                || (end < v.end && !end.is_multiple_of(PMD_SIZE)))
    })
}

bitflags! {
    /// `MREMAP_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct MremapFlags: u32 {
        /// The mapping may move to another address when it cannot grow
        /// where it is.
        const MAYMOVE = 1 << 0;
        /// Move to exactly `new_addr` (whatever is mapped there is unmapped
        /// first); needs MAYMOVE.
        const FIXED = 1 << 1;
        /// Move the pages but leave the old range mapped, empty: its next
        /// access faults fresh zero pages. Needs MAYMOVE and equal lengths.
        const DONTUNMAP = 1 << 2;
    }
}

/// What an mremap does, as [`Mremap::plan`] decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MremapPlan {
    /// Nothing changes; the answer is the old address.
    Same,
    /// Unmap `[start, end)`, the tail the new length leaves out.
    Shrink {
        /// First byte unmapped (the old address plus the new length).
        start: u64,
        /// The old range's end.
        end: u64,
    },
    /// The VMA grows in place up to `end` (the range up to there is free).
    Grow {
        /// The old range's end.
        start: u64,
        /// The new end.
        end: u64,
    },
    /// Move to `to`: unmap `[to, to + new_len)` first when `fixed`, and the
    /// old range's tail beyond `new_len` when it shrinks; then a VMA of the
    /// old flags at `[to, to + new_len)`, the PTEs of the first
    /// `min(old_len, new_len)` bytes moved there (an [`MmuNotifyEvent::Unmap`]
    /// of the old range they leave), and the old range unmapped unless
    /// `dontunmap`.
    Move {
        /// The new address.
        to: u64,
        /// The new range was named by the caller (MREMAP_FIXED).
        fixed: bool,
        /// Bytes whose PTEs move.
        moved: u64,
        /// MREMAP_DONTUNMAP.
        dontunmap: bool,
    },
}

/// The arguments of `mremap(old, old_len, new_len, flags, new_addr)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mremap {
    /// Start of the range to remap.
    pub old: u64,
    /// Its length.
    pub old_len: u64,
    /// The length it gets.
    pub new_len: u64,
    /// MAYMOVE, FIXED, DONTUNMAP.
    pub flags: MremapFlags,
    /// Where to move with [`MremapFlags::FIXED`] (ignored without).
    pub new_addr: u64,
}

impl Mremap {
    /// Checks the call against `vma`, the VMA of `old`, and decides what it
    /// does, as Linux would: EINVAL for
    /// misalignment (2 MiB in a HUGE VMA), zero lengths, FIXED or DONTUNMAP
    /// without MAYMOVE, DONTUNMAP with a length change, or a FIXED range
    /// overlapping the old one; EFAULT when the old range is not inside one
    /// VMA; ENOMEM when it must grow, cannot in place and may not move (or
    /// `find_free(len, align)`, the mm's choice of a free range, finds none).
    /// `is_free(start, end)` says whether no VMA overlaps a range.
    pub fn plan(
        &self,
        vma: Option<Vma>,
        is_free: impl Fn(u64, u64) -> bool,
        find_free: impl FnOnce(u64, u64) -> Option<u64>,
    ) -> Result<MremapPlan, Errno> {
        let Mremap {
            old,
            old_len,
            new_len,
            flags,
            new_addr,
        } = *self;
        let may_move = flags.contains(MremapFlags::MAYMOVE);
        let fixed = flags.contains(MremapFlags::FIXED);
        let dontunmap = flags.contains(MremapFlags::DONTUNMAP);
        if old_len == 0
            || new_len == 0
            || ((fixed || dontunmap) && !may_move)
            || (dontunmap && old_len != new_len)
        {
            return Err(Errno::EINVAL);
        }
        let old_end = old.checked_add(old_len).ok_or(Errno::EINVAL)?;
        if fixed {
            // Before the VMA is looked at, as Linux's mremap_to.
            let new_end = new_addr.checked_add(new_len).ok_or(Errno::EINVAL)?;
            if new_addr < old_end && old < new_end {
                return Err(Errno::EINVAL);
            }
        }
        let vma = vma.ok_or(Errno::EFAULT)?;
        let align = if vma.flags.contains(VmFlags::HUGE) {
            PMD_SIZE
        } else {
            PAGE_SIZE
        };
        if [old, old_len, new_len]
            .iter()
            .any(|x| !x.is_multiple_of(align))
            || (fixed && !new_addr.is_multiple_of(align))
        {
            return Err(Errno::EINVAL);
        }
        if old < vma.start || old_end > vma.end {
            return Err(Errno::EFAULT);
        }
        let moved = old_len.min(new_len);
        if fixed {
            return Ok(MremapPlan::Move {
                to: new_addr,
                fixed: true,
                moved,
                dontunmap,
            });
        }
        if !dontunmap {
            if new_len == old_len {
                return Ok(MremapPlan::Same);
            }
            if new_len < old_len {
                return Ok(MremapPlan::Shrink {
                    start: old + new_len,
                    end: old_end,
                });
            }
            let grown = old.checked_add(new_len).ok_or(Errno::ENOMEM)?;
            if old_end == vma.end && is_free(old_end, grown) {
                return Ok(MremapPlan::Grow {
                    start: old_end,
                    end: grown,
                });
            }
            if !may_move {
                return Err(Errno::ENOMEM);
            }
        }
        let to = find_free(new_len, align).ok_or(Errno::ENOMEM)?;
        Ok(MremapPlan::Move {
            to,
            fixed: false,
            moved,
            dontunmap,
        })
    }
}

/// What the CPU page table says about one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// No translation (never touched, reclaimed, or no page table at all).
    None,
    /// A 4 KiB leaf.
    Present {
        /// Page frame number (physical address >> 12).
        pfn: u64,
        /// The leaf allows writes.
        writable: bool,
    },
    /// A 2 MiB leaf. `pfn` is the frame of its *first* 4 KiB page (2 MiB
    /// aligned); the frame backing `addr` is `pfn + ((addr % 2 MiB) >> 12)`.
    Huge {
        /// First frame of the leaf.
        pfn: u64,
        /// The leaf allows writes.
        writable: bool,
    },
    /// The shared zero page (an anonymous read fault maps it read-only; a write
    /// fault replaces it by copy-on-write).
    Zero {
        /// The zero page's frame.
        pfn: u64,
    },
    /// A special entry (Linux: `pte_special()` that is not the zero page): a
    /// raw pfn the device must not be given.
    Special,
    /// A device-private entry (Linux: a swap-type entry of a
    /// `MEMORY_DEVICE_PRIVATE` page): not accessible to the CPU, the data
    /// lives in page `vram_pfn` of `owner`'s memory. A CPU fault on it
    /// calls the owner's [`DevPagemapOps::migrate_to_ram`]; unmapping it
    /// calls [`DevPagemapOps::page_free`]. `huge`: a 2 MiB entry at the PMD
    /// level (only in a HUGE VMA), whose data is the 512 device pages from
    /// `vram_pfn` (2 MiB aligned), handed back whole
    /// ([`DevPagemapOps::migrate_to_ram`], [`DevPagemapOps::page_free`]
    /// with `huge`).
    DevicePrivate {
        /// The device whose memory holds the page.
        owner: DeviceOwner,
        /// The page's frame number in that device's memory (VRAM offset >> 12);
        /// the first of the 2 MiB page's for `huge`.
        vram_pfn: u64,
        /// The process may write the page (once it is back in system memory).
        writable: bool,
        /// A 2 MiB device page (the walk answers it with [`PMD_SHIFT`]).
        huge: bool,
    },
    /// A migration entry: the page is being migrated (its old contents are
    /// held by the migration, see [`migrate`]). It doubles as the page
    /// lock: a fault on it waits for the migration to finish
    /// ([`migrate::migration_entry_wait`]). At the PTE level for a 4 KiB
    /// page, at the PMD level (the walk answers it with [`PMD_SHIFT`]) for
    /// a 2 MiB one.
    Migration,
    /// A device-exclusive entry ([`exclusive`]): system frame `pfn` stays
    /// the process's, but the CPU may not use it while `owner`'s device
    /// holds it for atomics. A CPU fault on it restores the normal PTE
    /// first, announcing an [`MmuNotifyEvent::Exclusive`] with no owner;
    /// munmap, madvise and exit free the frame, mprotect restores the PTE
    /// ([`exclusive`]). 4 KiB only.
    Exclusive {
        /// The device holding the page.
        owner: DeviceOwner,
        /// The system frame (unchanged by the exclusive access).
        pfn: u64,
        /// The PTE it restores allows writes.
        writable: bool,
    },
}

/// One compare-and-exchange of [`Mm::pte_exchange_run`]: the 4 KiB PTE of
/// `addr` becomes `new` if it is `old`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PteSwap {
    /// The page.
    pub addr: u64,
    /// What its PTE must hold.
    pub old: PageState,
    /// What it holds afterwards.
    pub new: PageState,
}

/// One step of the software page-table walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walk {
    /// The state of the page containing the walked address.
    pub state: PageState,
    /// log2 of the naturally aligned block around the walked address that
    /// `state` describes: [`PAGE_SHIFT`] for a PTE-level answer, [`PMD_SHIFT`]
    /// for a 2 MiB leaf *or* a missing page table (then the whole 2 MiB block
    /// is `None`). Lets HMM fill 512 entries from one walk.
    pub shift: u32,
}

bitflags! {
    /// `FAULT_FLAG_*` as far as HMM uses them.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct FaultFlags: u32 {
        /// `FAULT_FLAG_WRITE`: fault for write access (COW, mkwrite).
        const WRITE = 1 << 0;
        /// `FAULT_FLAG_REMOTE`: the access is not by the current CPU context
        /// (it is the device's), so do not charge the current task / check
        /// protection keys.
        const REMOTE = 1 << 1;
        /// `FAULT_FLAG_ALLOW_RETRY | FAULT_FLAG_RETRY_NOWAIT`: the handler may
        /// return [`FaultError::Retry`] instead of blocking. It must *not*
        /// drop the mmap lock (unlike Linux), see docs/hmm.md.
        const ALLOW_RETRY = 1 << 2;
    }
}

/// Why `handle_mm_fault` failed (Linux: the `VM_FAULT_*` error bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultError {
    /// `VM_FAULT_SIGSEGV`: no VMA, or the access is not permitted.
    Sigsegv,
    /// `VM_FAULT_SIGBUS`: the backing store failed.
    Sigbus,
    /// `VM_FAULT_OOM`.
    Oom,
    /// `VM_FAULT_RETRY`: would block, only with [`FaultFlags::ALLOW_RETRY`].
    Retry,
}

impl core::fmt::Display for FaultError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let s = match self {
            FaultError::Sigsegv => "VM_FAULT_SIGSEGV",
            FaultError::Sigbus => "VM_FAULT_SIGBUS",
            FaultError::Oom => "VM_FAULT_OOM",
            FaultError::Retry => "VM_FAULT_RETRY",
        };
        f.write_str(s)
    }
}

impl core::error::Error for FaultError {}

/// The address space (`mm_struct`). See docs/hmm.md "Implementing `Mm`".
///
/// Lock types come from the implementation because only it knows what is safe
/// in its context: the firmware supplies interrupt-safe spin locks (a fault
/// may be serviced from an interrupt bottom half on a single vCPU), the
/// simulator supplies `parking_lot` so that host threads do not burn CPU.
pub trait Mm: Send + Sync + Sized + 'static {
    /// Mutex used for short, non-calling-out critical sections (HMM's
    /// `hmm->lock`, the `mm->hmm` slot).
    type RawMutex: lock_api::RawMutex + Send + Sync;
    /// Reader/writer lock used for the mmap lock, HMM's `mirrors_sem` and the
    /// notifier list.
    type RawRwLock: lock_api::RawRwLock + Send + Sync;
    /// What the mmap lock protects (the VMA tree). The read guard derefs to it,
    /// so the implementation's `vma_lookup` reads VMAs through the very guard
    /// HMM was handed.
    type MmapData: Send + Sync;

    /// The mmap lock (`mmap_sem`). Use [`mmap_read_lock`] / [`mmap_write_lock`]
    /// to take it; HMM only accepts the resulting guards.
    fn mmap_lock(&self) -> &RwLock<Self::RawRwLock, Self::MmapData>;

    /// The generic per-mm state this module manages (users count, notifier
    /// chain, `mm->hmm`). Embed one [`MmCore`] per address space.
    fn core(&self) -> &MmCore<Self>;

    /// The VMA containing `addr`, if any (Linux 5.14's `vma_lookup`; 5.3 HMM
    /// used `find_vma` and then checked `vm_start`).
    fn vma_lookup(&self, mmap: &MmapReadGuard<'_, Self>, addr: u64) -> Option<Vma>;

    /// The first VMA that ends above `addr`: the one containing it, or the
    /// next one up (Linux's `find_vma`). What a walk over a range with gaps
    /// uses to step over a gap in one lookup.
    fn find_vma(&self, mmap: &MmapReadGuard<'_, Self>, addr: u64) -> Option<Vma>;

    /// Software page-table walk for one address: never faults, never sleeps.
    /// The implementation synchronises with its own page-table updates
    /// (Linux: the page-table lock); HMM tolerates a result that is stale by
    /// the time it returns because every change is bracketed by
    /// `invalidate_range_start/end`.
    fn walk(&self, mmap: &MmapReadGuard<'_, Self>, addr: u64) -> Walk;

    /// [`Mm::walk`] for a run of 4 KiB pages: the states of the pages from
    /// `addr` on (all in `addr`'s 2 MiB block; `out` is not empty) into
    /// `out`, returning how many it filled, from 0 (no PTE-level answer:
    /// HMM asks [`Mm::walk`] instead) to `out.len()`. HMM asks this first
    /// for every run of 4 KiB entries, so an implementation can take its
    /// page-table lock and find the last-level table once for the whole
    /// run. The same staleness rules as `walk` apply.
    ///
    /// The default walks one page.
    fn walk_ptes(&self, mmap: &MmapReadGuard<'_, Self>, addr: u64, out: &mut [PageState]) -> usize {
        out[0] = self.walk(mmap, addr).state;
        1
    }

    /// Resolve a fault at `addr` (Linux `handle_mm_fault`). Runs with the mmap
    /// lock held for read and must leave it held. Any PTE it replaces (COW of
    /// the zero page, for instance) must be bracketed by
    /// [`mmu_notifier_invalidate_range_start`] / `_end`, as Linux does.
    fn handle_mm_fault(
        &self,
        mmap: &MmapReadGuard<'_, Self>,
        addr: u64,
        flags: FaultFlags,
    ) -> Result<(), FaultError>;

    /// Resolve faults for the 4 KiB pages of `[start, end)`, all inside one
    /// non-huge VMA and all wanting `flags`: what HMM asks for a run of
    /// entries of one fault-around window. Pages that already satisfy
    /// `flags` (present, and writable if `flags` has WRITE) are left alone.
    /// Returns how many pages from `start` it handled before the first
    /// error (at least the first page on success; handled pages stay
    /// handled) and how many of them, from `start` on, it wrote the state
    /// of into `out` (at most `out.len()`): what the page table held for
    /// them when it was done, as [`Mm::walk_ptes`] would answer. HMM takes
    /// those as walked and walks again from the first page it was not
    /// told about.
    ///
    /// The default handles `start` alone with [`Mm::handle_mm_fault`] and
    /// reports no state (HMM then walks it again and comes back for the
    /// next page), exactly the per-page protocol. An implementation may do
    /// the whole run in one page-table pass with its frames allocated in
    /// one batch, and save HMM the walk after it.
    fn handle_mm_fault_range(
        &self,
        mmap: &MmapReadGuard<'_, Self>,
        start: u64,
        end: u64,
        flags: FaultFlags,
        out: &mut [PageState],
    ) -> (u64, usize, Result<(), FaultError>) {
        let _ = (end, out);
        match self.handle_mm_fault(mmap, start, flags) {
            Ok(()) => (1, 0, Ok(())),
            Err(e) => (0, 0, Err(e)),
        }
    }

    /// Tear the address space down: free page tables and frames. Called by the
    /// last [`mmput`] *after* the release notifiers ran. Must not take the
    /// mmap lock (a caller of `mmput` may hold it), as Linux's `exit_mmap`.
    fn exit_mmap(&self);

    /// Monotonic time in nanoseconds (for `range_wait_until_valid`'s timeout).
    fn now_ns(&self) -> u64;

    /// The CPU page table a device may read to check itself (Linux's
    /// `mm->pgd`), as the [`faultline_abi::CpuRoot`] word its contexts
    /// carry: the coherence checker compares every translation the device
    /// uses against it. The default, [`faultline_abi::CpuRoot::NONE`], leaves
    /// the mirror's context unchecked.
    fn cpu_root(&self) -> faultline_abi::CpuRoot {
        faultline_abi::CpuRoot::NONE
    }

    /// What to do while polling (`cpu_relax`, or yield to a scheduler).
    fn cpu_relax(&self) {
        core::hint::spin_loop();
    }

    /// Replace the 4 KiB PTE of `addr` by `new` if it is `old` (a
    /// compare-and-exchange under the page-table lock; a missing page table
    /// is allocated when `old` is [`PageState::None`]). `new` is
    /// `None`, `Zero`, `Present`, a 4 KiB `DevicePrivate` or `Migration`;
    /// `old` and `new` never name a 2 MiB entry or a special entry (a 2 MiB
    /// entry is `Err`: see [`Mm::pmd_exchange`]). `Err` carries what
    /// the PTE holds instead (nothing changed). Frames and device pages
    /// change hands with the entry (the caller owns what it took out and
    /// must have allocated what it puts in); the implementation flushes
    /// the CPU TLB for a translation it removes, keeps its count of
    /// device pages ([`MmCore::device_pages`]) and sends no
    /// notifier: the caller brackets the change (the migration does).
    ///
    /// The default supports nothing (an `Mm` without migration): it
    /// answers the current state.
    fn pte_exchange(
        &self,
        mmap: &MmapReadGuard<'_, Self>,
        addr: u64,
        old: PageState,
        new: PageState,
    ) -> Result<(), PageState> {
        let _ = (old, new);
        Err(self.walk(mmap, addr).state)
    }

    /// [`Mm::pte_exchange`] of each of `swaps` (in increasing address
    /// order), its result in the same slot of `done` (as long as `swaps`):
    /// what a migration does for every page of its range at each step, so
    /// that an implementation can take its page-table lock, look up the
    /// VMA and find the last-level table once per run instead of per page.
    /// Each exchange succeeds or fails on its own, as if done alone.
    ///
    /// The default exchanges one by one.
    fn pte_exchange_run(
        &self,
        mmap: &MmapReadGuard<'_, Self>,
        swaps: &[PteSwap],
        done: &mut [Result<(), PageState>],
    ) {
        for (s, d) in swaps.iter().zip(done) {
            *d = self.pte_exchange(mmap, s.addr, s.old, s.new);
        }
    }

    /// [`Mm::pte_exchange`] for the 2 MiB entry (PMD) of `addr`'s block in
    /// a HUGE VMA: `old` and `new` are `None`, `Huge`, a `huge`
    /// `DevicePrivate` or `Migration` (which then stands for the PMD-level
    /// migration entry). Frames (512 from a `Huge`'s pfn) and device pages
    /// change hands with the entry as there; the count of device pages
    /// moves by 512. The default supports nothing.
    fn pmd_exchange(
        &self,
        mmap: &MmapReadGuard<'_, Self>,
        addr: u64,
        old: PageState,
        new: PageState,
    ) -> Result<(), PageState> {
        let _ = (old, new);
        Err(self.walk(mmap, addr).state)
    }

    /// A 4 KiB frame for the process, counted as its own: the destination
    /// of a migration to system memory, which copies a whole page into it
    /// before the frame is mapped (or frees it unmapped), so its contents
    /// may be anything (an implementation need not zero it). `None` when
    /// memory is exhausted. The default has none.
    fn alloc_frame(&self) -> Option<u64> {
        None
    }

    /// Give back a frame from [`Mm::alloc_frame`] (or one a migration took
    /// out of the page table with [`Mm::pte_exchange`]).
    fn free_frame(&self, pfn: u64) {
        let _ = pfn;
    }

    /// 512 contiguous frames, 2 MiB aligned, counted as the process's: the
    /// destination of a 2 MiB page's migration to system memory, which
    /// writes all of it (so they need not be zeroed). The first pfn, or
    /// `None` when no such run is free. The default has none.
    fn alloc_huge_frame(&self) -> Option<u64> {
        None
    }

    /// Give back a run from [`Mm::alloc_huge_frame`] (or the frames of a
    /// 2 MiB leaf a migration took out with [`Mm::pmd_exchange`]).
    fn free_huge_frame(&self, pfn: u64) {
        let _ = pfn;
    }

    /// Whether frame `pfn` (a 4 KiB page, or the first of a 2 MiB one) is
    /// mapped by more than one PTE: shared copy-on-write after a fork, or
    /// a shared mapping's page in a forked family. A migration leaves such
    /// a frame where it is (Linux refuses pages with extra references): a
    /// copy in device memory would be one mm's only. The default (an mm
    /// without fork): never.
    fn frame_shared(&self, pfn: u64) -> bool {
        let _ = pfn;
        false
    }
}

/// Read guard of the mmap lock: the proof, demanded by `range_snapshot` and
/// `range_fault`, that the caller holds the lock for read. Its only
/// constructors take the lock.
///
/// It cannot be forged (private fields):
///
/// ```compile_fail,E0451
/// use faultline_driver::mm::{Mm, MmapReadGuard};
/// fn forge<M: Mm>(mm: &M) -> MmapReadGuard<'_, M> {
///     MmapReadGuard { mm, data: unimplemented!() }
/// }
/// ```
///
/// and a write guard is not accepted in its place:
///
/// ```compile_fail,E0308
/// use faultline_driver::hmm::{range_snapshot, HmmRange};
/// use faultline_driver::mm::{mmap_write_lock, Mm};
/// fn snap<M: Mm>(mm: &M, range: &mut HmmRange<M>) {
///     let guard = mmap_write_lock(mm);
///     let _ = range_snapshot(range, &guard);
/// }
/// ```
pub struct MmapReadGuard<'a, M: Mm> {
    mm: &'a M,
    data: RwLockReadGuard<'a, M::RawRwLock, M::MmapData>,
}

impl<'a, M: Mm> MmapReadGuard<'a, M> {
    /// The address space whose lock this is (HMM checks it is the range's).
    pub fn mm(&self) -> &'a M {
        self.mm
    }
}

impl<M: Mm> Deref for MmapReadGuard<'_, M> {
    type Target = M::MmapData;
    fn deref(&self) -> &M::MmapData {
        &self.data
    }
}

/// Write guard of the mmap lock (munmap/mprotect/mmap; `mirror_register`
/// demands it, as Linux's `hmm_mirror_register` asserts `mmap_sem` held for
/// write).
pub struct MmapWriteGuard<'a, M: Mm> {
    mm: &'a M,
    data: RwLockWriteGuard<'a, M::RawRwLock, M::MmapData>,
}

impl<'a, M: Mm> MmapWriteGuard<'a, M> {
    /// The address space whose lock this is.
    pub fn mm(&self) -> &'a M {
        self.mm
    }
}

impl<M: Mm> Deref for MmapWriteGuard<'_, M> {
    type Target = M::MmapData;
    fn deref(&self) -> &M::MmapData {
        &self.data
    }
}

impl<M: Mm> DerefMut for MmapWriteGuard<'_, M> {
    fn deref_mut(&mut self) -> &mut M::MmapData {
        &mut self.data
    }
}

/// `mmap_read_lock(mm)` (Linux 5.8 name for `down_read(&mm->mmap_sem)`).
pub fn mmap_read_lock<M: Mm>(mm: &M) -> MmapReadGuard<'_, M> {
    MmapReadGuard {
        mm,
        data: mm.mmap_lock().read(),
    }
}

/// `mmap_read_trylock(mm)`.
pub fn mmap_read_trylock<M: Mm>(mm: &M) -> Option<MmapReadGuard<'_, M>> {
    mm.mmap_lock()
        .try_read()
        .map(|data| MmapReadGuard { mm, data })
}

/// `mmap_write_lock(mm)`.
pub fn mmap_write_lock<M: Mm>(mm: &M) -> MmapWriteGuard<'_, M> {
    MmapWriteGuard {
        mm,
        data: mm.mmap_lock().write(),
    }
}

/// Which kind of change an invalidation announces (`enum mmu_notifier_event`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmuNotifyEvent {
    /// munmap / exit: the range is gone.
    Unmap,
    /// The pages are being replaced or freed (reclaim, migration, COW).
    Clear,
    /// mprotect that may remove read access, or adds access: the new
    /// protection is not announced, so a mirror must clear its translations
    /// (PROT_NONE must not leave the device a readable one).
    ProtectionVma,
    /// Write-protection: every translation in the range stays as it is but
    /// loses write access (an mprotect to read-only announces this). A
    /// mirror may downgrade its translations to read-only instead of
    /// clearing them.
    ProtectionPage,
    /// Soft-dirty tracking.
    SoftDirty,
    /// A migration ([`migrate::migrate_vma_setup`]) unmaps the pages from
    /// the CPU. `owner` is the device that started it (Linux's
    /// `range->owner`, `MMU_NOTIFY_MIGRATE`), so its own mirror can tell
    /// its own migration from anyone else's; `None` for a migration the
    /// mm started. A mirror may only skip the invalidation of its own
    /// migration if its migration code updates its device page table
    /// itself before the source pages are freed.
    Migrate {
        /// The device migrating the pages.
        owner: Option<DeviceOwner>,
    },
    /// Device-exclusive access (Linux's `MMU_NOTIFY_EXCLUSIVE`): with
    /// `owner`, [`exclusive::make_device_exclusive`] is taking the pages
    /// from the CPU for that device, whose own mirror may recognise its
    /// request; with `None`, an exclusive entry is being restored to a
    /// normal PTE (a CPU access revokes the device's hold), which every
    /// mirror must treat as a clear.
    Exclusive {
        /// The device requesting exclusive access; `None` on revoke.
        owner: Option<DeviceOwner>,
    },
}

impl MmuNotifyEvent {
    /// What an mprotect to `prot` announces: [`ProtectionPage`] when the
    /// range stays readable and loses write (every translation is kept, only
    /// write-protected), [`ProtectionVma`] otherwise (read may go away).
    ///
    /// [`ProtectionPage`]: MmuNotifyEvent::ProtectionPage
    /// [`ProtectionVma`]: MmuNotifyEvent::ProtectionVma
    pub fn for_mprotect(prot: VmFlags) -> MmuNotifyEvent {
        if prot.contains(VmFlags::READ) && !prot.contains(VmFlags::WRITE) {
            MmuNotifyEvent::ProtectionPage
        } else {
            MmuNotifyEvent::ProtectionVma
        }
    }
}

/// `struct mmu_notifier_range`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmuNotifierRange {
    /// First byte of the invalidated range.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Why.
    pub event: MmuNotifyEvent,
    /// Whether notifiers may sleep / wait. `false` for OOM-reaper-like
    /// callers: a notifier that would have to block returns EAGAIN.
    pub blockable: bool,
}

/// A subscriber to the address space's changes (`struct mmu_notifier_ops`).
pub trait MmuNotifier<M: Mm>: Send + Sync {
    /// Called before the CPU page tables in `[start, end)` change. Once it
    /// returns `Ok`, the subscriber must not hand out translations for the
    /// range until `invalidate_range_end`. `Err` (only allowed when
    /// `!range.blockable`) aborts the invalidation; the chain then calls
    /// `invalidate_range_end` on the subscribers that had succeeded.
    fn invalidate_range_start(&self, mm: &M, range: &MmuNotifierRange) -> Result<(), Errno>;
    /// Called after the change, for every successful `invalidate_range_start`.
    fn invalidate_range_end(&self, mm: &M, range: &MmuNotifierRange);
    /// The address space is being torn down (last `mmput`).
    fn release(&self, mm: &M);
}

/// Identifies a registration in the notifier chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NotifierId(u64);

struct NotifierEntry<M: Mm> {
    id: NotifierId,
    // Weak: a subscriber's lifetime is its own (HMM's is its refcount); a dead
    // entry is skipped and pruned lazily, so that dropping the last `Arc` of a
    // subscriber from inside a callback cannot deadlock on this list.
    notifier: Weak<dyn MmuNotifier<M>>,
}

/// Generic per-address-space state, embedded by every [`Mm`] implementation.
pub struct MmCore<M: Mm> {
    /// `mm_users`.
    users: AtomicUsize,
    notifiers: RwLock<M::RawRwLock, Vec<NotifierEntry<M>>>,
    next_notifier_id: AtomicU64,
    /// `mm->hmm` (5.3): at most one live [`Hmm`] per address space.
    pub(crate) hmm: Mutex<M::RawMutex, Weak<Hmm<M>>>,
    /// The device memories whose pages this address space may map
    /// (`dev_pagemap`s, by owner).
    pub(crate) pagemaps: RwLock<M::RawRwLock, migrate::Pagemaps<M>>,
    /// Pages in device memory: 4 KiB device-private entries, and 512 per
    /// 2 MiB one.
    device_pages: AtomicU64,
    /// Copy-on-write breaks: write faults that gave this mm its own copy
    /// of a frame it shared with another (after a fork).
    cow_breaks: AtomicU64,
}

impl<M: Mm> MmCore<M> {
    /// A fresh address space has one user: its owner (the process).
    pub fn new() -> Self {
        MmCore {
            users: AtomicUsize::new(1),
            notifiers: RwLock::new(Vec::new()),
            next_notifier_id: AtomicU64::new(1),
            hmm: Mutex::new(Weak::new()),
            pagemaps: RwLock::new(Vec::new()),
            device_pages: AtomicU64::new(0),
            cow_breaks: AtomicU64::new(0),
        }
    }

    /// Copy-on-write breaks so far (a 2 MiB page's counts one).
    pub fn cow_breaks(&self) -> u64 {
        self.cow_breaks.load(Ordering::Relaxed)
    }

    /// The implementation's bookkeeping: a write fault copied a shared
    /// frame.
    pub fn count_cow_break(&self) {
        self.cow_breaks.fetch_add(1, Ordering::Relaxed);
    }

    /// 4 KiB pages that live in device memory now (a 2 MiB device-private
    /// entry counts 512): the frame accounting's view of device memory.
    pub fn device_pages(&self) -> u64 {
        self.device_pages.load(Ordering::Acquire)
    }

    /// The implementation's bookkeeping: `added` device pages (4 KiB
    /// units) got entries and `removed` lost theirs.
    pub fn account_device_pages(&self, added: u64, removed: u64) {
        if added > 0 {
            self.device_pages.fetch_add(added, Ordering::AcqRel);
        }
        if removed > 0 {
            self.device_pages.fetch_sub(removed, Ordering::AcqRel);
        }
    }

    /// Current `mm_users` (diagnostics and tests).
    pub fn users(&self) -> usize {
        self.users.load(Ordering::Acquire)
    }

    /// Number of live subscribers in the chain (diagnostics and tests).
    pub fn notifier_count(&self) -> usize {
        self.notifiers
            .read()
            .iter()
            .filter(|e| e.notifier.strong_count() > 0)
            .count()
    }
}

impl<M: Mm> Default for MmCore<M> {
    fn default() -> Self {
        Self::new()
    }
}

/// `mmget`: take a users reference. The caller must already hold one (or
/// otherwise know the address space is alive); use [`mmget_not_zero`] if not.
pub fn mmget<M: Mm>(mm: &M) {
    let old = mm.core().users.fetch_add(1, Ordering::AcqRel);
    debug_assert!(old > 0, "mmget on a dead address space");
}

/// `mmget_not_zero`: take a users reference unless the address space is
/// already dying (users reached zero). This is what makes HMM's EFAULT on a
/// dying address space race-free.
pub fn mmget_not_zero<M: Mm>(mm: &M) -> bool {
    mm.core()
        .users
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
            if u == 0 {
                None
            } else {
                Some(u + 1)
            }
        })
        .is_ok()
}

/// `mmput`: drop a users reference. The last one runs the release notifiers
/// (HMM's `release`, which calls every mirror's `release`) and then
/// [`Mm::exit_mmap`].
pub fn mmput<M: Mm>(mm: &M) {
    let old = mm.core().users.fetch_sub(1, Ordering::AcqRel);
    assert!(old > 0, "mmput without a matching mmget");
    if old == 1 {
        mmu_notifier_release(mm);
        mm.exit_mmap();
    }
}

/// `mmgrab`: take a structure reference. Keeps the `M` itself alive (not its
/// mappings). In Rust that is an `Arc` clone; the function exists so the code
/// reads like the kernel's.
pub fn mmgrab<M: Mm>(mm: &Arc<M>) -> Arc<M> {
    Arc::clone(mm)
}

/// `mmdrop`: drop a structure reference.
pub fn mmdrop<M: Mm>(mm: Arc<M>) {
    drop(mm);
}

/// Subscribe to the address space's invalidations and release
/// (`mmu_notifier_register`). The caller keeps the subscriber alive; the chain
/// holds only a weak reference.
pub fn mmu_notifier_register<M: Mm>(mm: &M, notifier: Weak<dyn MmuNotifier<M>>) -> NotifierId {
    let core = mm.core();
    let id = NotifierId(core.next_notifier_id.fetch_add(1, Ordering::Relaxed));
    let mut list = core.notifiers.write();
    // Prune subscribers that died since (see NotifierEntry).
    list.retain(|e| e.notifier.strong_count() > 0);
    list.push(NotifierEntry { id, notifier });
    id
}

/// Unsubscribe (`mmu_notifier_unregister_no_release`). Harmless if `id` is
/// gone already.
pub fn mmu_notifier_unregister<M: Mm>(mm: &M, id: NotifierId) {
    mm.core().notifiers.write().retain(|e| e.id != id);
}

/// Announce that `[range.start, range.end)` is about to change. Call it before
/// touching the PTEs and call [`mmu_notifier_invalidate_range_end`] after
/// (and after the TLB flush); free frames only after `_end`.
///
/// With `range.blockable == false` this may fail with EAGAIN: then no
/// subscriber is left in the "started" state and the caller must not change
/// the page tables nor call `_end`.
pub fn mmu_notifier_invalidate_range_start<M: Mm>(
    mm: &M,
    range: &MmuNotifierRange,
) -> Result<(), Errno> {
    let list = if range.blockable {
        mm.core().notifiers.read()
    } else {
        mm.core().notifiers.try_read().ok_or(Errno::EAGAIN)?
    };
    for (i, entry) in list.iter().enumerate() {
        let Some(n) = entry.notifier.upgrade() else {
            continue;
        };
        if let Err(e) = n.invalidate_range_start(mm, range) {
            debug_assert!(!range.blockable, "blockable invalidation failed");
            // Abort cleanly: close what was opened, so no subscriber stays in
            // the middle of an invalidation (Linux 5.3 left them there).
            for prev in list[..i].iter().filter_map(|p| p.notifier.upgrade()) {
                prev.invalidate_range_end(mm, range);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// The change announced by [`mmu_notifier_invalidate_range_start`] is done.
pub fn mmu_notifier_invalidate_range_end<M: Mm>(mm: &M, range: &MmuNotifierRange) {
    let list = mm.core().notifiers.read();
    for n in list.iter().filter_map(|e| e.notifier.upgrade()) {
        n.invalidate_range_end(mm, range);
    }
}

/// Run every subscriber's `release` and empty the chain (from the last
/// `mmput`). The list is taken out first so `release` callbacks run without
/// the chain lock: they may wait for work that itself sends notifications.
fn mmu_notifier_release<M: Mm>(mm: &M) {
    let list = core::mem::take(&mut *mm.core().notifiers.write());
    for n in list.iter().filter_map(|e| e.notifier.upgrade()) {
        n.release(mm);
    }
}

#[cfg(test)]
mod mremap_tests {
    use super::*;

    const VMA: Vma = Vma {
        start: 0x10_0000,
        end: 0x20_0000,
        flags: VmFlags::READ.union(VmFlags::WRITE),
    };

    fn plan(
        old: u64,
        old_len: u64,
        new_len: u64,
        flags: MremapFlags,
        new_addr: u64,
        free: bool,
    ) -> Result<MremapPlan, Errno> {
        Mremap {
            old,
            old_len,
            new_len,
            flags,
            new_addr,
        }
        .plan(
            Some(VMA).filter(|v| v.contains(old)),
            |_, _| free,
            |_, _| Some(0x80_0000),
        )
    }

    #[test]
    fn mremap_plan_follows_linux() {
        let (mv, fx, du) = (
            MremapFlags::MAYMOVE,
            MremapFlags::FIXED,
            MremapFlags::DONTUNMAP,
        );
        let p = PAGE_SIZE;
        let a = VMA.start;
        // Refusals.
        assert_eq!(plan(a, 0, p, mv, 0, true), Err(Errno::EINVAL));
        assert_eq!(plan(a + 1, p, p, mv, 0, true), Err(Errno::EINVAL));
        assert_eq!(plan(a, p, p, fx, 0x40_0000, true), Err(Errno::EINVAL));
        assert_eq!(plan(a, p, p, du, 0, true), Err(Errno::EINVAL));
        assert_eq!(plan(a, p, 2 * p, mv | du, 0, true), Err(Errno::EINVAL));
        assert_eq!(plan(a, 2 * p, p, mv | fx, a + p, true), Err(Errno::EINVAL));
        assert_eq!(plan(0x30_0000, p, p, mv, 0, true), Err(Errno::EFAULT));
        assert_eq!(
            plan(VMA.end - p, 2 * p, 2 * p, mv, 0, true),
            Err(Errno::EFAULT)
        );
        assert_eq!(
            plan(VMA.end - p, p, 2 * p, MremapFlags::empty(), 0, false),
            Err(Errno::ENOMEM)
        );
        // Growth in place only at the VMA's end; elsewhere a move.
        assert_eq!(
            plan(a, p, 2 * p, MremapFlags::empty(), 0, true),
            Err(Errno::ENOMEM)
        );
        assert_eq!(
            plan(VMA.end - p, p, 2 * p, mv, 0, true),
            Ok(MremapPlan::Grow {
                start: VMA.end,
                end: VMA.end + p
            })
        );
        assert_eq!(
            plan(a, p, 2 * p, mv, 0, true),
            Ok(MremapPlan::Move {
                to: 0x80_0000,
                fixed: false,
                moved: p,
                dontunmap: false
            })
        );
        assert_eq!(
            plan(a, 2 * p, p, MremapFlags::empty(), 0, true),
            Ok(MremapPlan::Shrink {
                start: a + p,
                end: a + 2 * p
            })
        );
        assert_eq!(
            plan(a, p, p, MremapFlags::empty(), 0, true),
            Ok(MremapPlan::Same)
        );
        assert_eq!(
            plan(a, 2 * p, p, mv | fx, 0x40_0000, true),
            Ok(MremapPlan::Move {
                to: 0x40_0000,
                fixed: true,
                moved: p,
                dontunmap: false
            })
        );
        assert_eq!(
            plan(a, p, p, mv | du, 0, true),
            Ok(MremapPlan::Move {
                to: 0x80_0000,
                fixed: false,
                moved: p,
                dontunmap: true
            })
        );
        // A HUGE VMA moves in 2 MiB units only.
        let huge = Vma {
            flags: VMA.flags | VmFlags::HUGE,
            start: 0,
            end: 2 * PMD_SIZE,
        };
        let m = Mremap {
            old: 0,
            old_len: PMD_SIZE,
            new_len: PMD_SIZE + p,
            flags: mv,
            new_addr: 0,
        };
        assert_eq!(
            m.plan(Some(huge), |_, _| true, |_, _| None),
            Err(Errno::EINVAL)
        );
    }

    #[test]
    fn splits_huge_only_off_2m_boundaries() {
        let huge = Vma {
            flags: VmFlags::HUGE,
            start: PMD_SIZE,
            end: 3 * PMD_SIZE,
        };
        assert!(splits_huge([&huge], PMD_SIZE + PAGE_SIZE, 2 * PMD_SIZE));
        assert!(splits_huge([&huge], 0, PMD_SIZE + PAGE_SIZE));
        assert!(!splits_huge([&huge], 2 * PMD_SIZE, 3 * PMD_SIZE));
        assert!(!splits_huge([&huge], PAGE_SIZE, 4 * PMD_SIZE + PAGE_SIZE));
        assert!(!splits_huge([&huge], 0, PAGE_SIZE));
    }
}
