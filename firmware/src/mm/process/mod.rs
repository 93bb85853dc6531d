//! Process address spaces on real x86-64 page tables.
//!
//! A [`Process`] owns one [`ProcessMm`]: a PML4 whose kernel half (entries 0
//! and 256..512) is copied from the kernel's, a sorted VMA list under an mmap lock,
//! and page tables under a page-table lock. Memory is anonymous, private or
//! shared ([`MapFlags::SHARED`]: a fork keeps it shared, and migration
//! leaves it alone), demand-paged: a read fault maps the shared zero page
//! read-only, a write fault (or a write after such a read: copy-on-write of
//! the zero page) maps a fresh zeroed frame. [`ProcessMm::fork`] copies the
//! address space, private pages copy-on-write ([`fork`] has the rules). `ProcessMm` implements the mirror layer's
//! [`faultline_driver::mm::Mm`] trait, so HMM (and the GPU driver behind it)
//! can mirror it.
//!
//! # API
//!
//! ```ignore
//! let p = Process::new()?;                               // Err(ENOMEM)
//! let a = p.mmap(None, 16 * 4096, Prot::READ | Prot::WRITE, MapFlags::empty())?;
//! let h = p.mmap(None, 4 << 20, Prot::READ | Prot::WRITE, MapFlags::HUGE)?; // 2 MiB leaves
//! p.run(|| user::write_u64(a, 42))?;                     // CR3 switch; demand paging
//! let seen = p.run(|| user::read_u64(a + 4096));         // Ok(0): zero page
//! p.mprotect(a, 4096, Prot::READ)?;
//! let e = p.run(|| user::write_u64(a, 1)).unwrap_err(); // Segfault { addr: a, access: Write, reason: ReadOnly, .. }
//! p.munmap(a, 16 * 4096)?;
//! let w = p.translate(h);                                // the software walk: Walk { state, shift }
//! let mm: &Arc<ProcessMm> = p.mm();                      // for hmm::mirror_register etc.
//! drop(p);                                               // mmput: release notifiers, then every frame back
//! ```
//!
//! * [`ProcessMm::mmap`]`(addr, len, prot, flags)`: `addr` is a hint (used
//!   if free) unless [`MapFlags::FIXED`] (then it must be free: EINVAL
//!   otherwise, Linux's `MAP_FIXED_NOREPLACE` without EEXIST). `len` is
//!   rounded up to the page size (2 MiB with [`MapFlags::HUGE`], which also
//!   wants a 2 MiB-aligned `addr`). [`MapFlags::POPULATE`] faults every page
//!   in at once. Any of READ/WRITE/EXEC implies READ (x86 has no write-only
//!   or execute-only pages); `Prot::empty()` is PROT_NONE. Returns the
//!   address. Errors: EINVAL (alignment, range outside the user half
//!   `mm::USER_BASE..USER_END`, FIXED overlap), ENOMEM (no gap, or
//!   POPULATE ran out of frames), EFAULT (address space torn down).
//! * [`ProcessMm::munmap`], [`ProcessMm::mprotect`]: page-aligned ranges;
//!   EINVAL when they would split a 2 MiB page; mprotect over a hole is
//!   ENOMEM (as Linux). munmap frees page-table pages left without a
//!   mapping.
//! * [`ProcessMm::mremap`]`(`[`Mremap`]`)`: [`Mremap::plan`] decides
//!   (shrink, grow in place, move; MREMAP_FIXED / MREMAP_DONTUNMAP) and
//!   checks (EINVAL, EFAULT, ENOMEM as Linux); a move allocates the
//!   destination's page tables first (ENOMEM: nothing moved), then moves
//!   the entries (frames, zero page, device-private and 2 MiB ones) under
//!   one `Unmap` of the old range, flushes and prunes the old range's
//!   tables. Returns the new address.
//! * [`ProcessMm::fork`]: a child [`Process`] with copies of the VMAs and
//!   leaves, no notifiers; private frames shared copy-on-write (a write
//!   fault copies a frame another PTE still maps, 2 MiB pages as a unit),
//!   shared VMAs populated and shared; device-private pages come back to
//!   system memory first and device-exclusive entries are restored. A
//!   frame mapped twice is freed by whichever PTE goes last.
//! * [`ProcessMm::madvise_dontneed`]: MADV_DONTNEED, under the mmap lock
//!   for read: each VMA's part zapped under its own `Clear`; EINVAL across
//!   a 2 MiB page or on a special VMA, ENOMEM after a hole.
//! * [`Process::run`] / [`run`]: runs a closure with the process's page
//!   tables in CR3; a fault that cannot be resolved ends the closure and
//!   comes back as `Err(`[`Segfault`]`)` with address, access and
//!   [`SegvReason`]. Touch process memory through [`user`] (checked to stay
//!   in the user half). No lock is held while the closure runs, so the GPU
//!   fault path (HMM `range_fault` → [`Mm::handle_mm_fault`] with REMOTE)
//!   may run on the same CPU while the closure waits for the device.
//! * [`zero_pfn`]: the shared zero page's frame (allocated at boot, never
//!   freed). [`ProcessMm::stats`]: page-table pages, data frames and faults
//!   of this process; `mm::frames::stats().free` is the global count.
//!
//! # Ordering rules (what the mirror depends on)
//!
//! munmap, mprotect, mremap, madvise, fork (`ProtectionPage` over each
//! private VMA) and copy-on-write (the zero page's, a shared frame's)
//! announce the change with
//! `mmu_notifier_invalidate_range_start` before the page tables change,
//! flush the CPU TLB (`invlpg`, or a CR3 reload beyond 8 pages or after
//! freeing page-table pages; nothing when the process is not loaded, since
//! without PCIDs loading it flushes), call `_end`, and only then free frames.
//! Permission upgrades (a write fault on a writable VMA) need no notifier.
//! An mprotect to read-only announces `ProtectionPage` (translations kept,
//! write-protected: a mirror may downgrade), any other `ProtectionVma`.
//! The last `mmput` runs the release notifiers and then [`Mm::exit_mmap`],
//! which frees every frame and page-table page (the PML4 goes with the last
//! `Arc`).
//!
//! # Locks
//!
//! Both locks are the interrupt-safe ones from `crate::sync` (interrupts off
//! while held), so an interrupt handler servicing a device fault cannot
//! deadlock on code it interrupted. The page-table lock is never held while
//! notifiers run. The #PF path only *tries* the mmap lock: a page fault
//! while the same CPU holds it for writing is reported, not deadlocked.

pub mod fork;
pub mod freed;
mod pt;
mod run;
mod vmas;

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::ops::Deref;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bitflags::bitflags;
use faultline_driver::errno::Errno;
use faultline_driver::mm::exclusive::exclusive_entry_restore;
use faultline_driver::mm::migrate::{device_private_fault, migration_entry_wait};
use faultline_driver::mm::{
    device_page_free, mmap_read_lock, mmap_read_trylock, mmap_write_lock, mmput,
    mmu_notifier_invalidate_range_end, mmu_notifier_invalidate_range_start, splits_huge,
    DeviceOwner, FaultError, FaultFlags, Mm, MmCore, MmapReadGuard, MmuNotifierRange,
    MmuNotifyEvent, Mremap, MremapPlan, PageState, PteSwap, VmFlags, Vma, Walk, PAGE_SHIFT,
    PAGE_SIZE, PMD_SHIFT, PMD_SIZE,
};

use crate::sync::{IrqMutex, IrqRwLock, RawIrqRwLock, RawIrqSpinlock};
use pt::{Flush, FrameList, PageTables, P, W};

pub use run::{
    call_user, is_active, page_fault, user, user_page_fault, Access, Segfault, SegvReason,
};

/// Entry bits and frames for page tables the kernel builds for user mode
/// outside any process (the agent's, `crate::user`).
pub mod pt_entry {
    pub use super::pt::{alloc_zeroed, A, P, U, W};

    /// Writes entry `i` of the page-table page at physical `table`.
    pub fn write(table: u64, i: usize, e: u64) {
        assert!(i < 512 && table.is_multiple_of(4096));
        let slot = (crate::mm::DIRECT_MAP_BASE + table + i as u64 * 8) as *mut u64;
        // SAFETY: `table` is a page-table frame the caller allocated and
        // owns (in the direct map); i < 512 keeps the store inside it.
        unsafe { slot.write_volatile(e) }
    }
}
pub use vmas::Vmas;

bitflags! {
    /// `PROT_*`. The empty set is PROT_NONE.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Prot: u32 {
        const READ = 1 << 0;
        const WRITE = 1 << 1;
        const EXEC = 1 << 2;
    }

    /// `MAP_*` beyond anonymous (which every mapping is) and private
    /// (unless SHARED).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct MapFlags: u32 {
        /// Use `addr` exactly; fail (EINVAL) if anything is mapped there.
        const FIXED = 1 << 0;
        /// Back the mapping with 2 MiB pages (one PDE each); `addr` and the
        /// rounded length are 2 MiB multiples.
        const HUGE = 1 << 1;
        /// Fault every page in now (write faults if writable).
        const POPULATE = 1 << 2;
        /// `MAP_SHARED`: a `VmFlags::SHARED` VMA. Within one process it
        /// faults exactly like a private mapping (zero page, then
        /// copy-on-write of it); a fork keeps its frames shared, writable
        /// on both sides. Migration to device memory leaves its pages alone.
        const SHARED = 1 << 3;
    }
}

impl Prot {
    fn vm_flags(self) -> VmFlags {
        if self.is_empty() {
            return VmFlags::empty();
        }
        let mut f = VmFlags::READ;
        if self.contains(Prot::WRITE) {
            f |= VmFlags::WRITE;
        }
        if self.contains(Prot::EXEC) {
            f |= VmFlags::EXEC;
        }
        f
    }
}

static ZERO_PA: AtomicU64 = AtomicU64::new(0);

/// Pages a range fault allocates frames for at a time.
const FAULT_BATCH: usize = 64;

/// Allocates the shared zero page and sets up user mode (SMEP/SMAP, the
/// agent's mapping: `crate::user::init`). Call once at boot, after the heap.
pub fn init() {
    crate::user::init();
    let pa = pt::alloc_zeroed()
        .unwrap_or_else(|_| crate::fatal(format_args!("no frame for the zero page")));
    ZERO_PA.store(pa, Ordering::Relaxed);
}

fn zero_pa() -> u64 {
    let pa = ZERO_PA.load(Ordering::Relaxed);
    assert!(pa != 0, "process::init not called");
    pa
}

/// The shared zero page's frame number (what the walk reports as `Zero`).
pub fn zero_pfn() -> u64 {
    zero_pa() >> 12
}

/// Counters of one address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmStats {
    /// Page-table pages, the PML4 included.
    pub page_tables: u64,
    /// 4 KiB frames of process memory (a 2 MiB page counts 512), the zero
    /// page excluded.
    pub data_frames: u64,
    /// Faults resolved (CPU and remote).
    pub faults: u64,
    /// Device-private entries: pages that live in a device's memory.
    pub device_pages: u64,
}

/// One process's address space (`mm_struct`).
pub struct ProcessMm {
    core: MmCore<ProcessMm>,
    mmap: IrqRwLock<Vmas>,
    pt: IrqMutex<PageTables>,
    pml4: u64,
    dead: AtomicBool,
    faults: AtomicU64,
}

/// A process: the owner of one users reference of its [`ProcessMm`]
/// (dropping it is `mmput`). Derefs to the address space.
pub struct Process {
    mm: Arc<ProcessMm>,
}

impl Process {
    /// A process with an empty address space.
    pub fn new() -> Result<Process, Errno> {
        let tables = PageTables::new().map_err(|_| Errno::ENOMEM)?;
        let pml4 = tables.pml4_phys();
        Ok(Process {
            mm: Arc::new(ProcessMm {
                core: MmCore::new(),
                mmap: IrqRwLock::new(Vmas::default()),
                pt: IrqMutex::new(tables),
                pml4,
                dead: AtomicBool::new(false),
                faults: AtomicU64::new(0),
            }),
        })
    }

    /// The address space (structure reference), for the mirror layer.
    pub fn mm(&self) -> &Arc<ProcessMm> {
        &self.mm
    }

    /// Runs kernel code `f` inside this process; see [`run`].
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> Result<R, Segfault> {
        run::run(&self.mm, f)
    }

    /// This process's agent: CPU accesses to its memory made in user mode
    /// (`crate::user::agent`).
    pub fn agent(&self) -> crate::user::agent::Agent<'_> {
        crate::user::agent::Agent::new(&self.mm)
    }
}

impl Deref for Process {
    type Target = ProcessMm;
    fn deref(&self) -> &ProcessMm {
        &self.mm
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        mmput(&*self.mm);
    }
}

/// `[addr, addr + len)` rounded up to `align`, inside the user half.
fn user_range(addr: u64, len: u64, align: u64) -> Result<(u64, u64), Errno> {
    if len == 0 || !addr.is_multiple_of(align) {
        return Err(Errno::EINVAL);
    }
    let end = len
        .checked_next_multiple_of(align)
        .and_then(|l| addr.checked_add(l))
        .ok_or(Errno::EINVAL)?;
    if addr < crate::mm::USER_BASE || end > crate::mm::USER_END {
        return Err(Errno::EINVAL);
    }
    Ok((addr, end))
}

impl ProcessMm {
    /// Physical address of the PML4 (what CR3 gets).
    pub fn pml4_phys(&self) -> u64 {
        self.pml4
    }

    /// Whether the last user is gone (`exit_mmap` ran).
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> MmStats {
        let pt = self.pt.lock();
        MmStats {
            page_tables: pt.tables + 1,
            data_frames: pt.data,
            faults: self.faults.load(Ordering::Relaxed),
            device_pages: self.core.device_pages(),
        }
    }

    /// Gives back what a zap took out (after `invalidate_range_end`):
    /// device pages to their owners, frames to the allocator.
    fn release_frames(&self, mut freed: FrameList) {
        let devices = core::mem::take(&mut freed.devices);
        freed.free_all();
        self.release_device_pages(devices);
    }

    fn release_device_pages(&self, devices: Vec<(DeviceOwner, u64, bool)>) {
        let pages = devices
            .iter()
            .map(|&(_, _, huge)| if huge { 512 } else { 1 })
            .sum();
        self.core.account_device_pages(0, pages);
        for (owner, vram_pfn, huge) in devices {
            device_page_free(self, owner, vram_pfn, huge);
        }
    }

    /// A copy of the VMA list.
    pub fn vmas(&self) -> Vec<Vma> {
        mmap_read_lock(self).iter().copied().collect()
    }

    /// The software walk without the mmap lock (notifier callbacks run
    /// while munmap holds it for writing): takes only the page-table lock.
    pub fn translate(&self, addr: u64) -> Walk {
        self.pt.lock().walk(addr, zero_pa())
    }

    /// `mmap`; see the module docs.
    pub fn mmap(
        &self,
        addr: Option<u64>,
        len: u64,
        prot: Prot,
        flags: MapFlags,
    ) -> Result<u64, Errno> {
        let huge = flags.contains(MapFlags::HUGE);
        let align = if huge { PMD_SIZE } else { PAGE_SIZE };
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        let len = len.checked_next_multiple_of(align).ok_or(Errno::EINVAL)?;
        let mut vm = prot.vm_flags();
        if huge {
            vm |= VmFlags::HUGE;
        }
        if flags.contains(MapFlags::SHARED) {
            vm |= VmFlags::SHARED;
        }
        let mut vmas = mmap_write_lock(self);
        if self.is_dead() {
            return Err(Errno::EFAULT);
        }
        let start = match addr {
            Some(a) if flags.contains(MapFlags::FIXED) => {
                let (s, e) = user_range(a, len, align)?;
                if vmas.overlaps(s, e) {
                    return Err(Errno::EINVAL);
                }
                s
            }
            Some(a) if user_range(a, len, align).is_ok_and(|(s, e)| !vmas.overlaps(s, e)) => a,
            None if flags.contains(MapFlags::FIXED) => return Err(Errno::EINVAL),
            _ => vmas
                .find_free(len, align, crate::mm::USER_BASE)
                .ok_or(Errno::ENOMEM)?,
        };
        vmas.insert(Vma {
            start,
            end: start + len,
            flags: vm,
        });
        drop(vmas);
        if flags.contains(MapFlags::POPULATE) && vm.contains(VmFlags::READ) {
            let access = if vm.contains(VmFlags::WRITE) {
                run::Access::Write
            } else {
                run::Access::Read
            };
            let failed = {
                let vmas = mmap_read_lock(self);
                (start..start + len)
                    .step_by(align as usize)
                    .any(|a| self.fault(&vmas, a, access, FaultFlags::empty()).is_err())
            };
            if failed {
                self.munmap(start, len)?;
                return Err(Errno::ENOMEM);
            }
        }
        Ok(start)
    }

    /// Runs `change` on the page tables inside `range`'s invalidation:
    /// the notifiers' `_start`, then `change` under the page-table lock
    /// and its TLB flush, then `_end` (frames are released by the caller,
    /// after). `what` names the operation if a notifier refuses.
    fn change_tables(
        &self,
        range: &MmuNotifierRange,
        what: &str,
        change: impl FnOnce(&mut PageTables, &mut Flush),
    ) {
        let notified = mmu_notifier_invalidate_range_start(self, range).is_ok();
        {
            let mut pt = self.pt.lock();
            let mut flush = Flush::new();
            change(&mut pt, &mut flush);
            flush.run(is_active(self));
        }
        if notified {
            mmu_notifier_invalidate_range_end(self, range);
        } else {
            log::error!("{what}: a notifier refused a blockable invalidation");
        }
    }

    /// `munmap`; see the module docs.
    pub fn munmap(&self, addr: u64, len: u64) -> Result<(), Errno> {
        let (start, end) = user_range(addr, len, PAGE_SIZE)?;
        let mut vmas = mmap_write_lock(self);
        if splits_huge(vmas.overlapping(start, end), start, end) {
            return Err(Errno::EINVAL);
        }
        let freed = self.unmap_locked(&mut vmas, start, end);
        drop(vmas);
        self.release_frames(freed);
        Ok(())
    }

    /// The body of munmap, under the mmap write lock; the caller releases
    /// what it returns once the lock is dropped.
    fn unmap_locked(&self, vmas: &mut Vmas, start: u64, end: u64) -> FrameList {
        let mut freed = FrameList::new();
        let Some((lo, hi)) = vmas.remove(start, end) else {
            return freed;
        };
        let range = MmuNotifierRange {
            start: lo,
            end: hi,
            event: MmuNotifyEvent::Unmap,
            blockable: true,
        };
        self.change_tables(&range, "munmap", |pt, flush| {
            pt.zap(lo, hi, zero_pa(), &mut freed, flush);
            pt.prune(lo, hi, |a, b| vmas.overlaps(a, b), &mut freed, flush);
        });
        freed
    }

    /// `mremap`; see the module docs.
    pub fn mremap(&self, args: Mremap) -> Result<u64, Errno> {
        user_range(args.old, args.old_len, PAGE_SIZE)?;
        let mut vmas = mmap_write_lock(self);
        if self.is_dead() {
            return Err(Errno::EFAULT);
        }
        let vma = vmas.lookup(args.old);
        let plan = args.plan(
            vma,
            |a, b| b <= crate::mm::USER_END && !vmas.overlaps(a, b),
            |len, align| vmas.find_free(len, align, crate::mm::USER_BASE),
        )?;
        let mut lists = Vec::new();
        let r = match plan {
            MremapPlan::Same => Ok(args.old),
            MremapPlan::Shrink { start, end } => {
                lists.push(self.unmap_locked(&mut vmas, start, end));
                Ok(args.old)
            }
            MremapPlan::Grow { start, end } => {
                let flags = vma.expect("planned").flags;
                vmas.insert(Vma { start, end, flags });
                Ok(args.old)
            }
            MremapPlan::Move { .. } => {
                let flags = vma.expect("planned").flags;
                self.mremap_move(&mut vmas, &mut lists, args, flags, plan)
            }
        };
        drop(vmas);
        for l in lists {
            self.release_frames(l);
        }
        r
    }
    /// The move of an mremap (see [`MremapPlan::Move`]), under the mmap
    /// write lock; what it unmaps goes to `lists`.
    fn mremap_move(
        &self,
        vmas: &mut Vmas,
        lists: &mut Vec<FrameList>,
        args: Mremap,
        flags: VmFlags,
        plan: MremapPlan,
    ) -> Result<u64, Errno> {
        let MremapPlan::Move {
            to,
            fixed,
            moved,
            dontunmap,
        } = plan
        else {
            return Ok(args.old);
        };
        let new_end = to.checked_add(args.new_len).ok_or(Errno::EINVAL)?;
        if fixed {
            user_range(to, args.new_len, PAGE_SIZE)?;
            if splits_huge(vmas.overlapping(to, new_end), to, new_end) {
                return Err(Errno::EINVAL);
            }
            lists.push(self.unmap_locked(vmas, to, new_end));
        }
        let (start, end) = (args.old, args.old + moved);
        if args.old_len > moved {
            lists.push(self.unmap_locked(vmas, end, args.old + args.old_len));
        }
        // The destination's page tables first: out of frames,
        // nothing has moved.
        self.pt
            .lock()
            .prepare_move(start, end, to)
            .map_err(|_| Errno::ENOMEM)?;
        if !dontunmap {
            vmas.remove(start, end);
        }
        vmas.insert(Vma {
            start: to,
            end: new_end,
            flags,
        });
        let range = MmuNotifierRange {
            start,
            end,
            event: MmuNotifyEvent::Unmap,
            blockable: true,
        };
        let mut tables = FrameList::new();
        self.change_tables(&range, "mremap", |pt, flush| {
            pt.move_range(start, end, to, flush);
            pt.prune(start, end, |a, b| vmas.overlaps(a, b), &mut tables, flush);
        });
        lists.push(tables);
        Ok(to)
    }

    /// `mprotect`; see the module docs.
    pub fn mprotect(&self, addr: u64, len: u64, prot: Prot) -> Result<(), Errno> {
        let (start, end) = user_range(addr, len, PAGE_SIZE)?;
        let mut vmas = mmap_write_lock(self);
        if !vmas.covers(start, end) {
            return Err(Errno::ENOMEM);
        }
        if splits_huge(vmas.overlapping(start, end), start, end) {
            return Err(Errno::EINVAL);
        }
        let vm = prot.vm_flags();
        vmas.protect(start, end, vm);
        let range = MmuNotifierRange {
            start,
            end,
            event: MmuNotifyEvent::for_mprotect(vm),
            blockable: true,
        };
        self.change_tables(&range, "mprotect", |pt, flush| {
            pt.protect(start, end, vm, flush)
        });
        Ok(())
    }

    /// `madvise(MADV_DONTNEED)`; see the module docs.
    pub fn madvise_dontneed(&self, addr: u64, len: u64) -> Result<(), Errno> {
        if len == 0 && addr.is_multiple_of(PAGE_SIZE) {
            return Ok(());
        }
        let (start, end) = user_range(addr, len, PAGE_SIZE)?;
        let vmas = mmap_read_lock(self);
        if splits_huge(vmas.overlapping(start, end), start, end)
            || vmas
                .overlapping(start, end)
                .any(|v| v.flags.intersects(VmFlags::SPECIAL_KINDS))
        {
            return Err(Errno::EINVAL);
        }
        let mut covered = 0;
        for v in vmas.overlapping(start, end) {
            let range = MmuNotifierRange {
                start: v.start.max(start),
                end: v.end.min(end),
                event: MmuNotifyEvent::Clear,
                blockable: true,
            };
            covered += range.end - range.start;
            let mut freed = FrameList::new();
            self.change_tables(&range, "madvise", |pt, flush| {
                pt.zap(range.start, range.end, zero_pa(), &mut freed, flush)
            });
            self.release_frames(freed);
        }
        if covered < end - start {
            return Err(Errno::ENOMEM);
        }
        Ok(())
    }

    /// A CPU page fault at `addr` (from the #PF hook).
    fn cpu_fault(&self, addr: u64, access: Access) -> Result<(), SegvReason> {
        let vmas = mmap_read_trylock(self).ok_or(SegvReason::MmapLockHeld)?;
        self.fault(&vmas, addr, access, FaultFlags::empty())
    }

    /// The fault handler proper, under the mmap lock (read). `flags` only
    /// matter for a page in device memory or under migration (ALLOW_RETRY:
    /// do not wait for the migration).
    fn fault(
        &self,
        vmas: &MmapReadGuard<'_, Self>,
        addr: u64,
        access: Access,
        flags: FaultFlags,
    ) -> Result<(), SegvReason> {
        if self.is_dead() {
            return Err(SegvReason::Dead);
        }
        let vma = vmas.lookup(addr).ok_or(SegvReason::NoMapping)?;
        let f = vma.flags;
        if !f.contains(VmFlags::READ) {
            return Err(SegvReason::NoAccess);
        }
        match access {
            Access::Write if !f.contains(VmFlags::WRITE) => return Err(SegvReason::ReadOnly),
            Access::Exec if !f.contains(VmFlags::EXEC) => return Err(SegvReason::NoExec),
            _ => {}
        }
        self.faults.fetch_add(1, Ordering::Relaxed);
        let write = access == Access::Write;
        if f.contains(VmFlags::HUGE) {
            return self.fault_huge(vmas, addr, f, write, flags);
        }
        let zero = zero_pa();
        {
            let mut pt = self.pt.lock();
            let (t, i) = pt
                .pte(addr, true)
                .map_err(|_| SegvReason::OutOfMemory)?
                .expect("created");
            let e = t.get(i);
            if pt::is_swap(e) {
                drop(pt);
                return swap_fault(vmas, addr, e, flags);
            }
            if pt::is_exclusive(e) {
                drop(pt);
                exclusive_entry_restore(vmas, addr);
                return self.fault(vmas, addr, access, flags);
            }
            if e & P == 0 {
                // Not present: nothing cached, no flush, no notifier.
                if write {
                    let pa = pt::alloc_zeroed().map_err(|_| SegvReason::OutOfMemory)?;
                    t.set(i, pt::leaf(pa, f, true, false));
                    pt.data += 1;
                } else {
                    t.set(i, pt::leaf(zero, f, false, false));
                }
                return Ok(());
            }
            if !write || e & W != 0 {
                // Already satisfied: the fault came from a stale TLB entry,
                // which the #PF itself dropped.
                return Ok(());
            }
            if e & pt::ADDR != zero {
                // Permission upgrade of our own frame (a stale read-only
                // TLB entry only costs a spurious fault), unless a fork
                // shares it.
                if fork::upgrade_if_sole(t, i, e, f) {
                    return Ok(());
                }
                drop(pt);
                return self.cow_break(addr, e, f, false);
            }
        }
        self.cow_zero(addr & !(PAGE_SIZE - 1), f)
    }

    /// [`Mm::handle_mm_fault_range`] one page at a time: a walk, and a
    /// fault where the page does not already satisfy `flags`.
    fn fault_range_by_page(
        &self,
        mmap: &MmapReadGuard<'_, Self>,
        start: u64,
        end: u64,
        flags: FaultFlags,
    ) -> (u64, Result<(), FaultError>) {
        let write = flags.contains(FaultFlags::WRITE);
        let mut done = 0;
        let mut addr = start;
        while addr < end {
            let satisfied = match self.translate(addr).state {
                PageState::Present { writable, .. } | PageState::Huge { writable, .. } => {
                    !write || writable
                }
                PageState::Zero { .. } => !write,
                PageState::None
                | PageState::DevicePrivate { .. }
                | PageState::Migration
                | PageState::Exclusive { .. } => false,
                PageState::Special => break,
            };
            if !satisfied {
                if let Err(e) = self.handle_mm_fault(mmap, addr, flags) {
                    return (done, Err(e));
                }
            }
            done += 1;
            addr += PAGE_SIZE;
        }
        (done, Ok(()))
    }

    /// Replaces the zero page at `page` by a private zeroed frame, bracketed
    /// by the notifiers (a device may hold the zero page's translation).
    fn cow_zero(&self, page: u64, f: VmFlags) -> Result<(), SegvReason> {
        let fresh = pt::alloc_zeroed().map_err(|_| SegvReason::OutOfMemory)?;
        let zero = P | zero_pa();
        self.replace_leaf(page, false, fresh, f, 1, |e| e & (P | pt::ADDR) == zero)
            .map(|_| ())
    }

    /// Maps the fresh frame run `fresh` writable at `page` (a 4 KiB page,
    /// or the 2 MiB one with `huge`) in place of a leaf `still` accepts,
    /// inside a `Clear` of the page (a device may hold the old
    /// translation); `added` 4 KiB frames join the data count. A leaf
    /// that changed while the notifiers ran is left alone and `fresh`
    /// goes back to the allocator. Whether `fresh` was mapped.
    fn replace_leaf(
        &self,
        page: u64,
        huge: bool,
        fresh: u64,
        f: VmFlags,
        added: u64,
        still: impl Fn(u64) -> bool,
    ) -> Result<bool, SegvReason> {
        let size = if huge { PMD_SIZE } else { PAGE_SIZE };
        let range = MmuNotifierRange {
            start: page,
            end: page + size,
            event: MmuNotifyEvent::Clear,
            blockable: true,
        };
        let give_back = || {
            let pa = x86_64::PhysAddr::new(fresh);
            if huge {
                crate::mm::frames::free_2m(pa);
            } else {
                crate::mm::frames::free(pa);
            }
        };
        if mmu_notifier_invalidate_range_start(self, &range).is_err() {
            give_back();
            return Err(SegvReason::Notifier);
        }
        let used = {
            let mut pt = self.pt.lock();
            let slot = if huge {
                pt.pde(page, false)
            } else {
                pt.pte(page, false)
            };
            match slot.ok().flatten() {
                Some((t, i)) if still(t.get(i)) => {
                    t.set(i, pt::leaf(fresh, f, true, huge));
                    pt.data += added;
                    let mut flush = Flush::new();
                    flush.page(page);
                    flush.run(is_active(self));
                    true
                }
                _ => false,
            }
        };
        mmu_notifier_invalidate_range_end(self, &range);
        if !used {
            give_back();
        }
        Ok(used)
    }

    /// A fault in a 2 MiB VMA: any fault maps the whole 2 MiB page,
    /// writable if the VMA is (there is no huge zero page); a 2 MiB device
    /// page comes back whole.
    fn fault_huge(
        &self,
        vmas: &MmapReadGuard<'_, Self>,
        addr: u64,
        f: VmFlags,
        write: bool,
        flags: FaultFlags,
    ) -> Result<(), SegvReason> {
        let base = addr & !(PMD_SIZE - 1);
        let writable = f.contains(VmFlags::WRITE);
        {
            let mut pt = self.pt.lock();
            let (t, i) = pt
                .pde(base, true)
                .map_err(|_| SegvReason::OutOfMemory)?
                .expect("created");
            let e = t.get(i);
            if pt::is_swap(e) {
                drop(pt);
                return swap_fault(vmas, addr, e, flags);
            }
            if e & P != 0 {
                if write && e & W == 0 && !fork::upgrade_if_sole(t, i, e, f) {
                    drop(pt);
                    return self.cow_break(addr, e, f, true);
                }
                return Ok(());
            }
        }
        // Zero the 2 MiB outside the lock (tens of ms under PVM).
        let pa = pt::alloc_zeroed_2m().map_err(|_| SegvReason::OutOfMemory)?;
        let mut pt = self.pt.lock();
        let (t, i) = pt
            .pde(base, true)
            .map_err(|_| SegvReason::OutOfMemory)?
            .expect("created");
        // Only an empty PDE: a migration may have put an entry there
        // meanwhile (it too holds the mmap lock for read).
        if t.get(i) == 0 {
            t.set(i, pt::leaf(pa, f, writable, true));
            pt.data += 512;
        } else {
            drop(pt);
            crate::mm::frames::free_2m(x86_64::PhysAddr::new(pa));
        }
        Ok(())
    }

    fn teardown(&self) {
        self.dead.store(true, Ordering::Release);
        let mut devices = Vec::new();
        {
            let mut pt = self.pt.lock();
            pt.destroy(zero_pa(), &mut devices);
            let mut flush = Flush::new();
            flush.everything();
            flush.run(is_active(self));
        }
        self.release_device_pages(devices);
    }
}

/// A fault on a swap-type entry `e` (PTE or PDE) at `addr`: in device
/// memory or under migration, the generic path (which takes the page-table
/// lock itself; the caller dropped it).
fn swap_fault(
    vmas: &MmapReadGuard<'_, ProcessMm>,
    addr: u64,
    e: u64,
    flags: FaultFlags,
) -> Result<(), SegvReason> {
    let r = if e & pt::SWP_MIGRATION != 0 {
        migration_entry_wait(vmas, addr, flags)
    } else {
        device_private_fault(vmas, addr, flags)
    };
    r.map_err(|e| match e {
        FaultError::Oom => SegvReason::OutOfMemory,
        FaultError::Retry => SegvReason::Busy,
        FaultError::Sigbus | FaultError::Sigsegv => SegvReason::DeviceMemory,
    })
}

impl Drop for ProcessMm {
    fn drop(&mut self) {
        // Without the last mmput (a users reference leaked) the frames
        // would be lost with the tables: free them here.
        if !self.is_dead() {
            log::warn!("process mm dropped with {} users left", self.core.users());
            self.teardown();
        }
        self.pt.get_mut().free_pml4();
    }
}

impl ProcessMm {
    /// [`Mm::pte_exchange_run`] of swaps in one 2 MiB block of a VMA with
    /// flags `f`, under one page-table lock round: the last-level table is
    /// found once (made only if the block has none and a swap expects an
    /// empty PTE), each entry compared and replaced in it, one TLB flush.
    fn exchange_block(&self, f: VmFlags, swaps: &[PteSwap], done: &mut [Result<(), PageState>]) {
        let zero = zero_pa();
        let mut pt = self.pt.lock();
        let w = pt.walk(swaps[0].addr, zero);
        let wants_empty = swaps.iter().any(|s| s.old == PageState::None);
        let table = if w.shift == PAGE_SHIFT || (w.state == PageState::None && wants_empty) {
            pt.pte(swaps[0].addr, true).ok().flatten()
        } else {
            None
        };
        let Some((t, _)) = table else {
            // A 2 MiB entry, or no table and none to be made: every PTE
            // reads as the block's state.
            done.fill(Err(w.state));
            return;
        };
        let (mut frames_in, mut frames_out) = (0, 0);
        let (mut device_in, mut device_out) = (0, 0);
        let mut flush = Flush::new();
        // A 4 KiB migration entry is one fixed word: the exchanges that
        // install or restore a migration's pages compare words instead of
        // decoding the entry (what it holds is then known too).
        let mig = pt::swap_entry(PageState::Migration, false);
        let held = |e: u64| {
            (
                (e & P != 0 || pt::is_exclusive(e)) && e & pt::ADDR != zero,
                pt::device_page(e).is_some(),
            )
        };
        let mig_held = mig.map_or((false, false), held);
        for (s, d) in swaps.iter().zip(done) {
            let i = ((s.addr >> PAGE_SHIFT) & 511) as usize;
            let e = t.get(i);
            let locked = matches!(s.old, PageState::Migration) && Some(e) == mig;
            let new_e = match s.new {
                _ if !locked && pt::pte_state(e, zero) != s.old => None,
                PageState::None => Some(0),
                PageState::Zero { .. } => Some(pt::leaf(zero, f, false, false)),
                PageState::Present { pfn, writable } => {
                    Some(pt::leaf(pfn << PAGE_SHIFT, f, writable, false))
                }
                n @ PageState::Exclusive { .. } => pt::exclusive_entry(n),
                n => pt::swap_entry(n, false),
            };
            let Some(new_e) = new_e else {
                *d = Err(pt::pte_state(e, zero));
                continue;
            };
            t.set(i, new_e);
            // Frames change hands with the entry: the data count follows.
            let (had_frame, had_device) = if locked { mig_held } else { held(e) };
            let has_frame = matches!(
                s.new,
                PageState::Present { .. } | PageState::Exclusive { .. }
            );
            frames_in += u64::from(has_frame);
            frames_out += u64::from(had_frame);
            device_in += u64::from(matches!(s.new, PageState::DevicePrivate { .. }));
            device_out += u64::from(had_device);
            if e & P != 0 {
                flush.page(s.addr);
            }
            *d = Ok(());
        }
        pt.data = pt.data + frames_in - frames_out;
        self.core.account_device_pages(device_in, device_out);
        flush.run(is_active(self));
    }
}

impl Mm for ProcessMm {
    type RawMutex = RawIrqSpinlock;
    type RawRwLock = RawIrqRwLock;
    type MmapData = Vmas;

    fn mmap_lock(&self) -> &IrqRwLock<Vmas> {
        &self.mmap
    }

    fn core(&self) -> &MmCore<Self> {
        &self.core
    }

    fn vma_lookup(&self, mmap: &MmapReadGuard<'_, Self>, addr: u64) -> Option<Vma> {
        mmap.lookup(addr)
    }

    fn find_vma(&self, mmap: &MmapReadGuard<'_, Self>, addr: u64) -> Option<Vma> {
        mmap.find(addr)
    }

    fn walk(&self, _mmap: &MmapReadGuard<'_, Self>, addr: u64) -> Walk {
        self.translate(addr)
    }

    fn walk_ptes(
        &self,
        _mmap: &MmapReadGuard<'_, Self>,
        addr: u64,
        out: &mut [PageState],
    ) -> usize {
        self.pt.lock().walk_ptes(addr, zero_pa(), out)
    }

    fn handle_mm_fault(
        &self,
        mmap: &MmapReadGuard<'_, Self>,
        addr: u64,
        flags: FaultFlags,
    ) -> Result<(), FaultError> {
        // REMOTE changes nothing here: there is no task to charge and no
        // protection keys. ALLOW_RETRY only matters for a page under
        // migration (the one wait this handler has).
        let access = if flags.contains(FaultFlags::WRITE) {
            Access::Write
        } else {
            Access::Read
        };
        self.fault(mmap, addr, access, flags).map_err(|r| match r {
            SegvReason::OutOfMemory => FaultError::Oom,
            SegvReason::Busy => FaultError::Retry,
            SegvReason::DeviceMemory => FaultError::Sigbus,
            _ => FaultError::Sigsegv,
        })
    }

    /// One page-table pass per 2 MiB of the run: not-present pages get the
    /// zero page (read) or a frame from one batch allocation (write);
    /// present read-only pages a write needs go through [`ProcessMm::fault`]
    /// afterwards (permission upgrade, zero-page copy-on-write with its
    /// notifiers). Huge VMAs, a run leaving its VMA and refused accesses
    /// take the per-page path, which reports the error. The states told in
    /// `out` are those of the pass's own entries, up to the first page
    /// that needed the per-page path.
    fn handle_mm_fault_range(
        &self,
        mmap: &MmapReadGuard<'_, Self>,
        start: u64,
        end: u64,
        flags: FaultFlags,
        out: &mut [PageState],
    ) -> (u64, usize, Result<(), FaultError>) {
        let write = flags.contains(FaultFlags::WRITE);
        let vma = mmap.lookup(start).filter(|v| {
            !self.is_dead()
                && v.end >= end
                && !v.flags.contains(VmFlags::HUGE)
                && v.flags.contains(VmFlags::READ)
                && (!write || v.flags.contains(VmFlags::WRITE))
        });
        let Some(vma) = vma else {
            let (done, r) = self.fault_range_by_page(mmap, start, end, flags);
            return (done, 0, r);
        };
        let f = vma.flags;
        let zero = zero_pa();
        let mut done = 0;
        let mut addr = start;
        // Frames for one sub-run of pages; a segment is done in sub-runs so
        // the buffer stays small (setting up 4 KiB of stack per call costs
        // ~0.3 ms where the kernel is emulated).
        let mut frames_buf = [0u64; FAULT_BATCH];
        // States told in `out`: those of the pages from `start` up to the
        // first one the per-page pass takes (or `out` is full).
        let mut told = 0;
        let mut telling = true;
        while addr < end {
            let seg_end = end
                .min((addr | (PMD_SIZE - 1)) + 1)
                .min(addr + FAULT_BATCH as u64 * PAGE_SIZE);
            let n = ((seg_end - addr) / PAGE_SIZE) as usize;
            let mut upgrades = 0usize;
            {
                let mut pt = self.pt.lock();
                let Ok(Some((t, i0))) = pt.pte(addr, true) else {
                    return (done, told, Err(FaultError::Oom));
                };
                // An empty slot is 0: one test for the common case.
                let empty =
                    |e: u64| e == 0 || (e & P == 0 && !pt::is_swap(e) && !pt::is_exclusive(e));
                let need = if write {
                    (0..n).filter(|&k| empty(t.get(i0 + k))).count()
                } else {
                    0
                };
                let got = crate::mm::frames::alloc_zeroed_batch(&mut frames_buf[..need]);
                let mut used = 0;
                let mut faulted = 0;
                // The permission bits every new leaf of the run gets, worked
                // out once (a frame address has none of them set).
                let bits = pt::leaf(0, f, write, false);
                let zero_state = PageState::Zero {
                    pfn: zero >> PAGE_SHIFT,
                };
                for k in 0..n {
                    let e = t.get(i0 + k);
                    let now = if e != 0 && (pt::is_swap(e) || pt::is_exclusive(e)) {
                        // Device memory, migration or a device's exclusive
                        // hold: the per-page pass.
                        upgrades += 1;
                        None
                    } else if e & P == 0 {
                        let state = if write {
                            if used == got {
                                break;
                            }
                            let frame = frames_buf[used];
                            used += 1;
                            t.set(i0 + k, frame | bits);
                            PageState::Present {
                                pfn: frame >> PAGE_SHIFT,
                                writable: true,
                            }
                        } else {
                            t.set(i0 + k, zero | bits);
                            zero_state
                        };
                        faulted += 1;
                        Some(state)
                    } else if write && e & W == 0 {
                        upgrades += 1;
                        None
                    } else {
                        Some(pt::pte_state(e, zero))
                    };
                    match now {
                        Some(state) if telling && told < out.len() => {
                            out[told] = state;
                            told += 1;
                        }
                        _ => telling = false,
                    }
                }
                pt.data += used as u64;
                self.faults.fetch_add(faulted, Ordering::Relaxed);
                if used < need {
                    // Out of frames: what got mapped stays mapped.
                    let mapped = (0..n).take_while(|&k| t.get(i0 + k) & P != 0).count();
                    return (done + mapped as u64, told, Err(FaultError::Oom));
                }
            }
            if upgrades > 0 {
                for k in 0..n as u64 {
                    let a = addr + k * PAGE_SIZE;
                    let pass = match self.translate(a).state {
                        PageState::Zero { .. }
                        | PageState::Present {
                            writable: false, ..
                        } => write,
                        PageState::DevicePrivate { .. }
                        | PageState::Migration
                        | PageState::Exclusive { .. } => true,
                        _ => false,
                    };
                    if pass {
                        if let Err(e) = self.handle_mm_fault(mmap, a, flags) {
                            return (done + k, told, Err(e));
                        }
                    }
                }
            }
            done += n as u64;
            addr = seg_end;
        }
        (done, told, Ok(()))
    }

    fn exit_mmap(&self) {
        self.teardown();
    }

    fn pte_exchange(
        &self,
        mmap: &MmapReadGuard<'_, Self>,
        addr: u64,
        old: PageState,
        new: PageState,
    ) -> Result<(), PageState> {
        let mut done = [Ok(())];
        self.pte_exchange_run(mmap, &[PteSwap { addr, old, new }], &mut done);
        done[0]
    }

    fn pte_exchange_run(
        &self,
        mmap: &MmapReadGuard<'_, Self>,
        swaps: &[PteSwap],
        done: &mut [Result<(), PageState>],
    ) {
        // Runs of one 2 MiB block inside one VMA (or a single page outside
        // any): one VMA lookup, one lock round and one table walk each.
        let mut at = 0;
        while at < swaps.len() {
            let first = swaps[at].addr;
            let vma = mmap.lookup(first);
            let n = swaps[at..]
                .iter()
                .take_while(|s| {
                    s.addr >> PMD_SHIFT == first >> PMD_SHIFT
                        && vma.as_ref().is_some_and(|v| s.addr < v.end)
                })
                .count()
                .max(1);
            let f = vma.map_or(VmFlags::READ, |v| v.flags);
            self.exchange_block(f, &swaps[at..at + n], &mut done[at..at + n]);
            at += n;
        }
    }

    fn pmd_exchange(
        &self,
        mmap: &MmapReadGuard<'_, Self>,
        addr: u64,
        old: PageState,
        new: PageState,
    ) -> Result<(), PageState> {
        let f = mmap.lookup(addr).map_or(VmFlags::READ, |v| v.flags);
        let new_e = match new {
            PageState::None => 0,
            PageState::Huge { pfn, writable } => pt::leaf(pfn << PAGE_SHIFT, f, writable, true),
            s => pt::swap_entry(s, true).ok_or_else(|| self.translate(addr).state)?,
        };
        let mut pt = self.pt.lock();
        let w = pt.walk(addr, zero_pa());
        if w.state != old || w.shift != PMD_SHIFT {
            return Err(w.state);
        }
        let Ok(Some((t, i))) = pt.pde(addr, true) else {
            return Err(w.state);
        };
        let e = t.get(i);
        t.set(i, new_e);
        let frames = |s: PageState| {
            if matches!(s, PageState::Huge { .. }) {
                512
            } else {
                0
            }
        };
        let device = |s: PageState| {
            if matches!(s, PageState::DevicePrivate { .. }) {
                512
            } else {
                0
            }
        };
        pt.data = pt.data + frames(new) - frames(old);
        self.core.account_device_pages(device(new), device(old));
        if e & P != 0 {
            let mut flush = Flush::new();
            flush.page(addr);
            flush.run(is_active(self));
        }
        Ok(())
    }

    fn alloc_frame(&self) -> Option<u64> {
        // Not zeroed: a migration copies a whole page into it before the
        // frame is mapped (zeroing is ~0.3 ms a frame of emulated `rep
        // stosq`, a third of a page's migration back).
        crate::mm::frames::alloc().map(|pa| pa.as_u64() >> PAGE_SHIFT)
    }

    fn free_frame(&self, pfn: u64) {
        freed::Freer::new().data(pfn << PAGE_SHIFT, false);
    }

    fn alloc_huge_frame(&self) -> Option<u64> {
        // Not zeroed: the migration that asks writes all of it.
        crate::mm::frames::alloc_2m().map(|pa| pa.as_u64() >> PAGE_SHIFT)
    }

    fn free_huge_frame(&self, pfn: u64) {
        freed::Freer::new().data(pfn << PAGE_SHIFT, true);
    }

    fn now_ns(&self) -> u64 {
        crate::arch::time::now_ns()
    }

    fn cpu_root(&self) -> faultline_abi::CpuRoot {
        // Guest RAM ends far below the 1 TiB the word can name.
        faultline_abi::CpuRoot::x86_64(self.pml4).unwrap_or(faultline_abi::CpuRoot::NONE)
    }

    fn frame_shared(&self, pfn: u64) -> bool {
        fork::is_shared(pfn << PAGE_SHIFT)
    }
}
