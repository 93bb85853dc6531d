//! `fork` and copy-on-write: a frame mapped by more than one PTE.
//!
//! # References
//!
//! A data frame normally has one owner, the PTE that maps it. Fork is the
//! only way a second PTE maps it (the child's copy of the entry), so the
//! extra references live in a side table, [`SHARED`]: physical address →
//! number of PTEs beyond the first (a 2 MiB page is one entry, keyed by
//! its first frame). Frames that were never shared are not in it, and the
//! table is empty without forks, which the fault and free paths check with
//! one atomic load. Every path that lets go of a data frame does it
//! through [`super::freed::Freer::data`] (munmap and madvise zaps,
//! teardown, a migration's source, a COW break's old frame; mremap moves
//! entries and their frames keep their references), which asks
//! [`drop_ref`] first: a shared frame loses a reference there instead of
//! going back to the allocator.
//!
//! Only a fork adds a reference, and it holds the forking mm's mmap lock
//! for writing: a frame that one mm maps alone (no entry) cannot become
//! shared while that mm holds its own mmap lock for reading, which is what
//! lets a write fault reuse such a frame after one look at the table.
//! The table's lock is a leaf (nothing is taken under it).
//!
//! # Fork ([`ProcessMm::fork`])
//!
//! Under the parent's mmap write lock the child gets a copy of every VMA
//! and of every leaf, no notifiers and no mirror. Before that, with the
//! lock held for reading, the entries a copy cannot share are resolved:
//! device-private pages come back to system memory (the owner's
//! `migrate_to_ram`, as a CPU read would: the VRAM owner's reverse map and
//! eviction know one mm per page, where Linux instead shares the
//! device-private page read-only and COW-faults it back later),
//! device-exclusive entries are restored (revoking the device's hold, as
//! any CPU access does; Linux restores them at fork too) and migrations
//! waited for. Should one appear again before the write lock is taken, the
//! fork starts over.
//!
//! * Private VMAs are shared copy-on-write: each is announced to the
//!   parent's notifiers as one [`MmuNotifyEvent::ProtectionPage`] over the
//!   whole VMA (Linux's `copy_page_range` for COW mappings), its writable
//!   leaves lose W in the parent, the CPU TLB is flushed, `_end`; the
//!   child's leaves are read-only too. The next write fault on either side
//!   copies the frame if another PTE still maps it (a COW break: a `Clear`
//!   of that page in the faulting mm around the PTE switch, counted by
//!   [`faultline_driver::mm::MmCore::cow_breaks`]), or makes it writable
//!   again if it is the last (a permission upgrade, no notifier). A 2 MiB
//!   page is copied as a unit (there is no split). The zero page is
//!   mapped read-only in both and keeps its own copy-on-write.
//! * Shared VMAs ([`MapFlags::SHARED`](super::MapFlags::SHARED)) stay
//!   shared: the same frames, writable in both. Without a shared backing
//!   object (Linux backs them with shmem) a page not populated at fork
//!   would come up as a separate zero page on each side, so a writable
//!   shared VMA is populated in the parent first (a write fault on every
//!   page); a read-only one is copied as it is. Afterwards each side's PTEs
//!   are its own: madvise(DONTNEED) or munmap in one drops that side's
//!   reference only, and the other keeps the data. A write fault on a
//!   shared VMA's read-only leaf (an mprotect to read-only and back)
//!   makes it writable in place, never copies it.

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use faultline_driver::errno::Errno;
use faultline_driver::mm::fork::fork_prepare;
use faultline_driver::mm::{
    mmap_read_lock, mmap_write_lock, MmCore, MmuNotifierRange, MmuNotifyEvent, PageState, VmFlags,
    PAGE_SIZE, PMD_SIZE,
};

use super::pt::{self, Flush, PageTables, Table, P, W};
use super::{zero_pa, Process, ProcessMm, SegvReason, Vmas};
use crate::mm::{frames, DIRECT_MAP_BASE};
use crate::sync::{IrqMutex, IrqRwLock, RawIrqSpinlock};

/// Extra references of shared frames (see the module docs).
static SHARED: IrqMutex<BTreeMap<u64, u32>> = IrqMutex::new(BTreeMap::new());
/// Entries in [`SHARED`]: 0 lets the fault and free paths skip its lock.
static SHARED_FRAMES: AtomicUsize = AtomicUsize::new(0);

/// How often a fork resolves entries it cannot copy before giving up
/// (EAGAIN): each round needs a migration to slip in between the read and
/// the write lock.
const FORK_TRIES: u32 = 8;

/// Whether another PTE maps the frame at `pa` too.
pub fn is_shared(pa: u64) -> bool {
    SHARED_FRAMES.load(Ordering::Acquire) != 0 && SHARED.lock().contains_key(&pa)
}

/// Drops one reference of the frame at `pa` if it has extra ones: `true`
/// when another PTE still maps it (the caller must not free it).
pub fn drop_ref(pa: u64) -> bool {
    if SHARED_FRAMES.load(Ordering::Acquire) == 0 {
        return false;
    }
    let mut refs = SHARED.lock();
    let Some(n) = refs.get_mut(&pa) else {
        return false;
    };
    *n -= 1;
    if *n == 0 {
        refs.remove(&pa);
        SHARED_FRAMES.fetch_sub(1, Ordering::AcqRel);
    }
    true
}

/// Frames with extra references now (tests: a forked family that exited
/// leaves none).
pub fn shared_frames() -> usize {
    SHARED_FRAMES.load(Ordering::Acquire)
}

/// The table's lock held for a run of [`Refs::share`] (one lock round trip
/// per forked VMA, not per frame).
struct Refs(lock_api::MutexGuard<'static, RawIrqSpinlock, BTreeMap<u64, u32>>);

impl Refs {
    fn lock() -> Refs {
        Refs(SHARED.lock())
    }

    /// One more PTE maps the frame at `pa`.
    fn share(&mut self, pa: u64) {
        let n = self.0.entry(pa).or_insert(0);
        if *n == 0 {
            SHARED_FRAMES.fetch_add(1, Ordering::AcqRel);
        }
        *n += 1;
    }
}

/// `rep movsq` of `bytes` from frame run `src` to `dst`: one instruction,
/// which matters where supervisor code is emulated.
fn copy_frames(dst: u64, src: u64, bytes: u64) {
    // SAFETY: `dst` is a run just allocated for the caller, `src` a frame
    // run the faulting mm maps (its reference keeps it allocated); both
    // lie in the direct map and do not overlap.
    unsafe {
        core::arch::asm!(
            "rep movsq",
            inout("rdi") DIRECT_MAP_BASE + dst => _,
            inout("rsi") DIRECT_MAP_BASE + src => _,
            inout("rcx") bytes / 8 => _,
            options(nostack)
        );
    }
}

/// A write fault on the present read-only leaf `e` at `t[i]` (4 KiB or
/// 2 MiB) of a writable VMA with flags `f`: the frame is this mm's alone
/// or the VMA is shared, made writable here (`true`), or a private VMA's
/// frame another PTE maps (`false`: the caller drops the page-table lock
/// and breaks the COW with [`ProcessMm::cow_break`]). A shared VMA's leaf
/// is read-only after an mprotect round trip (the upgrade waits for the
/// write fault); copying it would silently unshare the mapping.
pub fn upgrade_if_sole(t: Table, i: usize, e: u64, f: VmFlags) -> bool {
    debug_assert!(e & P != 0 && e & W == 0);
    if !f.contains(VmFlags::SHARED) && is_shared(e & pt::ADDR) {
        return false;
    }
    t.set(i, e | W | pt::D);
    true
}

impl ProcessMm {
    /// `fork`: a child process with a copy of this address space; see the
    /// module docs. ENOMEM when the child's tables do not fit (nothing of
    /// the child remains; the parent's pages stay write-protected until
    /// their next write, which finds them unshared again), EFAULT on a
    /// dead address space, EAGAIN if migrations kept racing the copy.
    pub fn fork(&self) -> Result<Process, Errno> {
        for _ in 0..FORK_TRIES {
            self.fork_prepare()?;
            let vmas = mmap_write_lock(self);
            if self.is_dead() {
                return Err(Errno::EFAULT);
            }
            if let Some(child) = self.fork_locked(&vmas)? {
                return Ok(child);
            }
        }
        Err(Errno::EAGAIN)
    }

    /// Under the mmap lock for reading: what the copy cannot take resolved
    /// (`faultline_driver::mm::fork::fork_prepare`).
    fn fork_prepare(&self) -> Result<(), Errno> {
        let vmas = mmap_read_lock(self);
        if self.is_dead() {
            return Err(Errno::EFAULT);
        }
        fork_prepare(&vmas, |start, end| {
            self.pt.lock().first_unforkable(start, end, zero_pa())
        })
    }

    /// The copy proper, under the mmap write lock: `None` if an entry
    /// [`ProcessMm::fork_prepare`] resolves appeared meanwhile.
    fn fork_locked(&self, vmas: &Vmas) -> Result<Option<Process>, Errno> {
        {
            let pt = self.pt.lock();
            if vmas
                .iter()
                .any(|v| pt.first_unforkable(v.start, v.end, zero_pa()).is_some())
            {
                return Ok(None);
            }
        }
        let mut tables = PageTables::new().map_err(|_| Errno::ENOMEM)?;
        let mut result = Ok(());
        for v in vmas.iter() {
            let cow = !v.flags.contains(VmFlags::SHARED);
            let mut copy = |pt: &mut PageTables, flush: &mut Flush| {
                result = pt.copy_to(&mut tables, v.start, v.end, zero_pa(), cow, flush);
            };
            if cow {
                let range = MmuNotifierRange {
                    start: v.start,
                    end: v.end,
                    event: MmuNotifyEvent::ProtectionPage,
                    blockable: true,
                };
                self.change_tables(&range, "fork", copy);
            } else {
                // A shared VMA's leaves stay as they are: nothing to
                // announce, nothing to flush.
                copy(&mut self.pt.lock(), &mut Flush::new());
            }
            if result.is_err() {
                break;
            }
        }
        let pml4 = tables.pml4_phys();
        let child = Process {
            mm: Arc::new(ProcessMm {
                core: MmCore::new(),
                mmap: IrqRwLock::new(vmas.clone()),
                pt: IrqMutex::new(tables),
                pml4,
                dead: AtomicBool::new(false),
                faults: AtomicU64::new(0),
            }),
        };
        match result {
            Ok(()) => Ok(Some(child)),
            // Dropping the child gives back what was copied (references).
            Err(_) => Err(Errno::ENOMEM),
        }
    }

    /// A write fault on the read-only leaf `e` (4 KiB, or 2 MiB with
    /// `huge`) at `addr` of a writable VMA whose frame another PTE maps
    /// too: gives this mm its own copy. The caller dropped the page-table
    /// lock; if the leaf changed meanwhile the copy is dropped (whoever
    /// still needs the write faults again).
    pub(super) fn cow_break(
        &self,
        addr: u64,
        e: u64,
        f: VmFlags,
        huge: bool,
    ) -> Result<(), SegvReason> {
        let size = if huge { PMD_SIZE } else { PAGE_SIZE };
        let page = addr & !(size - 1);
        let old = e & pt::ADDR;
        let fresh = if huge {
            frames::alloc_2m()
        } else {
            frames::alloc()
        }
        .ok_or(SegvReason::OutOfMemory)?
        .as_u64();
        // Before the notifiers: the old frame is read-only wherever it is
        // mapped, so its contents cannot change (if a racing zap took it,
        // the leaf's re-check drops the copy).
        copy_frames(fresh, old, size);
        if self.replace_leaf(page, huge, fresh, f, 0, |now| now == e)? {
            self.core.count_cow_break();
            super::freed::Freer::new().data(old, huge);
        }
        Ok(())
    }
}

/// Brings the entry in `state` at `addr` (device-private, exclusive or a
/// migration entry) back to a normal one, whatever the VMA's protection.
impl PageTables {
    /// The first device-private, migration or device-exclusive entry of
    /// `[start, end)`, with what it says: what a fork cannot copy.
    pub fn first_unforkable(&self, start: u64, end: u64, zero_pa: u64) -> Option<(u64, PageState)> {
        let mut found = None;
        self.for_each_leaf(start, end, |a, t, i, _| {
            let e = t.get(i);
            if found.is_none() && (pt::is_swap(e) || pt::is_exclusive(e)) {
                found = Some(a);
            }
        });
        found.map(|a| (a, self.walk(a, zero_pa).state))
    }

    /// Copies every leaf of `[start, end)` into `child` at the same place
    /// (fork): each frame gains a reference; with `cow` the leaves are
    /// read-only on both sides afterwards (the parent's old writable
    /// translations go to `flush`). No swap-type or exclusive entry may be
    /// in the range ([`PageTables::first_unforkable`]). Out of frames for
    /// the child's tables: what was copied stays copied, with its
    /// references.
    pub fn copy_to(
        &mut self,
        child: &mut PageTables,
        start: u64,
        end: u64,
        zero_pa: u64,
        cow: bool,
        flush: &mut Flush,
    ) -> Result<(), pt::Oom> {
        let mut leaves = Vec::new();
        self.for_each_leaf(start, end, |a, t, i, huge| {
            let e = t.get(i);
            debug_assert!(!pt::is_swap(e) && !pt::is_exclusive(e), "fork: unresolved");
            let e = if cow && e & W != 0 {
                t.set(i, e & !W);
                flush.page(a);
                e & !W
            } else {
                e
            };
            leaves.push((a, e, huge));
        });
        // The child's tables first (the allocator's lock is not taken
        // under the references' one), then the references of what made it.
        let mut copied = 0;
        let mut result = Ok(());
        for &(a, e, huge) in &leaves {
            let slot = if huge {
                child.pde(a, true)
            } else {
                child.pte(a, true)
            };
            match slot {
                Ok(Some((t, i))) => t.set(i, e),
                _ => {
                    result = Err(pt::Oom);
                    break;
                }
            }
            copied += 1;
        }
        let mut refs = Refs::lock();
        for &(_, e, huge) in &leaves[..copied] {
            let pa = e & pt::ADDR;
            if huge {
                refs.share(pa);
                child.data += 512;
            } else if pa != zero_pa {
                refs.share(pa);
                child.data += 1;
            }
        }
        result
    }
}
