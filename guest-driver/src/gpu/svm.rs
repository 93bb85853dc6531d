//! Shared virtual memory: a GPU context that mirrors a process address
//! space through HMM (like nouveau's `svmm`).
//!
//! The device page table starts empty. A device access to an unmapped (or
//! insufficiently mapped) page raises a replayable fault; the bottom half
//! ([`Gpu::service_faults`]) hands the batch, sorted and deduplicated, to
//! the context, which services it window by window with the HMM driver
//! pattern (docs/hmm.md):
//!
//! ```text
//! range_register(range, mirror, window)          // holds an mm users reference
//! loop {
//!     { mmap read lock; range_fault(range, block) }   // faults CPU pages in
//!     lock the update lock (the page-table lock)
//!     if !range_check_seq(range) { unlock; retry }    // invalidated meanwhile
//!     write device leaves from range.pfns; unlock; break
//! }
//! range_unregister(range)
//! ```
//!
//! Faults the CPU mapping cannot satisfy (hole, PROT_NONE, a write to a
//! read-only mapping, a failed CPU fault) are cancelled: the command that
//! caused them completes with `Status::Cancelled`. The CPU side's
//! invalidations arrive in `sync_cpu_device_pagetables`, which clears the
//! device leaves of the range (or, for a write-protection, makes them
//! read-only) and returns only after the device acknowledged the TLB
//! invalidation. Process exit (`release`) tears the context's
//! mappings and stalled work down.
//!
//! With device memory attached and [`MigratePolicy::FirstTouch`], a window
//! is first migrated to VRAM (`migrate_vma` through the attached memory),
//! unless the device page table already satisfies its faults (stale ones:
//! no first touch), then serviced as above: HMM reports the migrated pages as device-private
//! and they get VRAM leaves. Locking rule: the migration runs before the
//! window's range is registered and with neither the mmap lock nor the
//! update lock held, because it takes both itself (the mmap lock for read
//! from setup to finalize, the update lock in this mirror's sync callback
//! for its `Migrate` invalidation); holding the mmap lock would be a
//! recursive read that a waiting writer turns into a deadlock, holding the
//! update lock a self-deadlock. Migrating first also keeps the migration's
//! own invalidation from stamping the range, so the pass that maps the
//! window does not retry for it. The sync callback recognises that
//! invalidation (event `Migrate` with this context's device owner): it
//! still clears the leaves and waits for the TLB acknowledgement (the
//! sources are freed after the copy), but keeps the density prefetcher's
//! marks, as the pages stay where the process put them.

use alloc::boxed::Box;
use alloc::sync::{Arc, Weak};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};

use faultline_abi::{Access, Pte, TraceKind, LEAF_2M, PAGE_SIZE};

use super::counters::DriverCounters;
use super::density::Density;
use super::device::{Fault, FaultHandler};
#[cfg(feature = "mutants")]
use super::mutant::{self, Mutant};
use super::pagetable::{Leaf, PageSize};
use super::policy::{MigratePolicy, Prefetch};
use super::stats::Op;
use super::{Context, Gpu, GpuError, PageTable, Platform};
use crate::errno::Errno;
use crate::hmm::{
    mirror_register, range_check_seq, range_fault, range_register, range_snapshot,
    range_unregister, range_wait_until_valid, HmmMirror, HmmMirrorOps, HmmPfnValue, HmmRange,
    HmmUpdate, HMM_PFN_FLAG_MAX, HMM_PFN_VALUE_MAX,
};
use crate::mm::{
    make_device_exclusive, mmap_read_lock, mmap_write_lock, DeviceOwner, Mm, MmapReadGuard,
    MmuNotifyEvent, PageState, VmFlags, PAGE_SHIFT, PMD_SHIFT,
};
use crate::sync::SpinMutex;

/// The driver's pfn encoding: entry = physical address | flag bits.
const PFN_SHIFT: u32 = PAGE_SHIFT;
const F_VALID: u64 = 1 << 0;
const F_WRITE: u64 = 1 << 1;
const F_DEVICE_PRIVATE: u64 = 1 << 2;
const FLAGS: [u64; HMM_PFN_FLAG_MAX] = [F_VALID, F_WRITE, F_DEVICE_PRIVATE];
const VALUES: [u64; HMM_PFN_VALUE_MAX] = [1 << 3, 0, 1 << 4];
// No special value carries `F_VALID`, so the fault path decodes an entry
// with one bit test instead of `HmmRange::entry_to_pfn`'s table scan.
const _: () = assert!(VALUES[0] & F_VALID == 0 && VALUES[1] & F_VALID == 0);
const _: () = assert!(VALUES[2] & F_VALID == 0);

/// Passes over one window before the bottom half gives up for this batch
/// (the access stays stalled and faults again after the replay).
const MAX_PASSES: u32 = 32;

/// SVM settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SvmConfig {
    /// Fault-around window (power of two, ≥ 4 KiB): a fault maps the whole
    /// aligned window around it, clipped to its VMA.
    pub fault_around: u64,
    /// The prefetch policy of this context; `None`: the GPU's
    /// ([`FaultPolicy::prefetch`](super::FaultPolicy)). Tests of the
    /// fault-around window itself pin `Prefetch::FaultAround`.
    pub prefetch: Option<Prefetch>,
    /// The migration policy of this context; `None`: the GPU's
    /// ([`FaultPolicy::migrate`](super::FaultPolicy)). It matters only
    /// while device memory is attached.
    pub migrate: Option<MigratePolicy>,
    /// GPU atomics on system memory through device-exclusive access (as a
    /// platform without coherent system-memory atomics needs, like
    /// nouveau's): writable system pages are mapped without ATOMIC, and a
    /// window with an atomic fault takes its pages from the CPU with
    /// [`make_device_exclusive`](crate::mm::make_device_exclusive) and maps
    /// those it holds with ATOMIC, until a CPU access revokes them. Off:
    /// every writable page is mapped with ATOMIC (the device's atomics on
    /// system memory are coherent with the CPU's).
    pub exclusive_atomics: bool,
}

impl Default for SvmConfig {
    fn default() -> Self {
        SvmConfig {
            fault_around: 64 << 10,
            prefetch: None,
            migrate: None,
            exclusive_atomics: false,
        }
    }
}

/// Device memory as the fault handler of the context it is attached to
/// uses it (`gpu::dmem` implements it).
pub(super) trait AttachedMemory<M: Mm>: Send + Sync {
    /// The owner id of its device-private entries.
    fn owner(&self) -> DeviceOwner;
    /// [`MigratePolicy::FirstTouch`]: migrate the system pages and holes
    /// of `[start, end)` (inside one VMA) to VRAM for a GPU fault; the
    /// pages migrated. Called with no lock held (it takes the mmap lock and,
    /// through the `Migrate` invalidation, the update lock itself).
    /// `hook` is the context's migrate hook.
    fn migrate_on_fault(
        &self,
        mm: &Arc<M>,
        hook: Option<MigrateHook<M>>,
        start: u64,
        end: u64,
    ) -> Result<u64, GpuError>;
}

/// One entry of [`SvmContext::snapshot`]: what the device would be given
/// for a page (or a 2 MiB leaf) if it faulted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapEntry {
    /// No CPU translation yet (untouched).
    None,
    /// A frame, with its physical address and whether writes are allowed.
    Valid {
        /// Physical address of the frame.
        phys: u64,
        /// Writable.
        writable: bool,
    },
    /// A device-private page of the attached device memory
    /// ([`DeviceMemory`](super::DeviceMemory)): its VRAM offset.
    Device {
        /// Offset of the page in VRAM.
        vram: u64,
        /// Writable.
        writable: bool,
    },
    /// A special mapping the device may not use.
    Special,
    /// An error entry.
    Error,
}

/// Called between `range_fault` and the sequence check (tests inject
/// invalidations here): `(start, end)` of the window. In a window taken
/// device-exclusive ([`SvmConfig::exclusive_atomics`]) it runs with the
/// mmap lock held for read, so it must not take it for write (munmap,
/// mprotect) there.
pub type CheckHook = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Called by a device memory's migration of `[start, end)` between
/// `migrate_vma_setup` and the copy, with the mmap lock (read) the
/// migration holds and the range's collected pages locked: tests stage
/// here what another CPU would do meanwhile (fault a page, start another
/// migration).
pub type MigrateHook<M> = Arc<dyn Fn(&MmapReadGuard<'_, M>, u64, u64) + Send + Sync>;

/// The SVM state of one context: the device context and its page table,
/// the mirrored address space, the fault-around setting. Shared by the
/// handle, the mirror callbacks and the fault handler; holds no reference
/// to the mirror, so there is no cycle.
struct SvmState<P: Platform, M: Mm> {
    ctx: Context<P>,
    mm: Arc<M>,
    released: AtomicBool,
    /// The [`DeviceOwner`] id of the device memory attached
    /// (`gpu::dmem`), 0 for none: its device-private pages are mapped
    /// with VRAM leaves.
    dmem_owner: AtomicU16,
    /// [`SvmConfig::exclusive_atomics`]: the owner its exclusive entries
    /// name while no device memory is attached (then the memory's owner
    /// serves, so HMM sees one owner for both kinds of entry).
    exclusive_owner: Option<DeviceOwner>,
    /// The device memory attached, for [`MigratePolicy::FirstTouch`].
    dmem: SpinMutex<Option<Arc<dyn AttachedMemory<M>>>>,
    /// The migration policy, fixed at bind time.
    migrate: MigratePolicy,
    fault_around: AtomicU64,
    /// The GPU's prefetch policy, fixed at bind time.
    prefetch: Prefetch,
    /// `Prefetch::Density`: faulted-or-resident pages per 2 MiB region.
    density: SpinMutex<Density>,
    hook: SpinMutex<Option<CheckHook>>,
    /// Whether `hook` holds one: the fault path reads this instead of
    /// taking the lock (which nearly always guards `None`).
    has_hook: AtomicBool,
    migrate_hook: SpinMutex<Option<MigrateHook<M>>>,
    /// The fault handler's reusable vectors (`None` while a service call
    /// holds them), boxed: taking it out and putting it back moves a
    /// pointer, not the vectors and the range (a copy of those costs where
    /// the kernel is emulated).
    scratch: SpinMutex<Option<Box<Scratch<M>>>>,
}

/// The binding of a context to an address space: its state plus the
/// registered mirror. Dropping it unhooks the fault handler, then
/// unregisters the mirror.
struct Binding<P: Platform, M: Mm> {
    state: Arc<SvmState<P, M>>,
    mirror: HmmMirror<M>,
}

/// The mirror callbacks (`HmmMirrorOps`): CPU invalidations and release.
/// They hold the state strongly, so an invalidation always reaches the page
/// table while the mirror is registered.
struct MirrorCallbacks<P: Platform, M: Mm>(Arc<SvmState<P, M>>);

/// The fault handler installed on the context: services fault batches
/// window by window. Weak, since the handle owns the binding.
struct SvmFaultHandler<P: Platform, M: Mm>(Weak<Binding<P, M>>);

/// A GPU context mirroring a process address space.
pub struct SvmContext<P: Platform, M: Mm> {
    binding: Arc<Binding<P, M>>,
}

impl<P: Platform, M: Mm> SvmContext<P, M> {
    /// Creates a context with an empty device page table and registers an
    /// HMM mirror on `mm`. EFAULT (as `GpuError::Mm`) if the address space
    /// is already dying.
    pub fn new(gpu: &Arc<Gpu<P>>, mm: &Arc<M>, cfg: SvmConfig) -> Result<Self, GpuError> {
        if !cfg.fault_around.is_power_of_two() || cfg.fault_around < PAGE_SIZE {
            return Err(GpuError::Invalid(
                "fault-around must be a power of two ≥ 4 KiB",
            ));
        }
        let exclusive_owner = match cfg.exclusive_atomics {
            true => Some(DeviceOwner::alloc().ok_or(GpuError::NoMemory)?),
            false => None,
        };
        let pt = PageTable::new(gpu.platform().clone())?;
        let ctx = Context::mirroring(gpu, pt, mm.cpu_root())?;
        let state = Arc::new(SvmState {
            ctx,
            mm: mm.clone(),
            released: AtomicBool::new(false),
            dmem_owner: AtomicU16::new(0),
            exclusive_owner,
            dmem: SpinMutex::new(None),
            migrate: cfg.migrate.unwrap_or(gpu.config().policy.migrate),
            fault_around: AtomicU64::new(cfg.fault_around),
            prefetch: cfg.prefetch.unwrap_or(gpu.config().policy.prefetch),
            density: SpinMutex::new(Density::default()),
            hook: SpinMutex::new(None),
            has_hook: AtomicBool::new(false),
            migrate_hook: SpinMutex::new(None),
            scratch: SpinMutex::new(Some(Box::new(Scratch::new()))),
        });
        let mirror = {
            let mmap = mmap_write_lock(&**mm);
            mirror_register(mm, &mmap, Arc::new(MirrorCallbacks(state.clone())))
                .map_err(GpuError::Mm)?
        };
        let binding = Arc::new(Binding { state, mirror });
        let handler: Arc<dyn FaultHandler> = Arc::new(SvmFaultHandler(Arc::downgrade(&binding)));
        binding.state.ctx.set_fault_handler(Some(handler));
        Ok(SvmContext { binding })
    }

    /// The device context (open channels on it).
    pub fn context(&self) -> &Context<P> {
        &self.binding.state.ctx
    }

    /// The mirrored address space.
    pub fn mm(&self) -> &Arc<M> {
        &self.binding.state.mm
    }

    /// The HMM mirror (tests register their own ranges on it).
    pub fn mirror(&self) -> &HmmMirror<M> {
        &self.binding.mirror
    }

    /// Map `mem`'s device-private pages (VRAM leaves) from now on, and
    /// migrate to it on fault if the policy says so; `None` stops (its
    /// pages fault back to system memory instead).
    pub(super) fn set_device_memory(&self, mem: Option<Arc<dyn AttachedMemory<M>>>) {
        let s = &self.binding.state;
        let id = mem.as_ref().map_or(0, |m| m.owner().get());
        *s.dmem.lock() = mem;
        s.dmem_owner.store(id, Ordering::Release);
    }

    /// Whether the address space was released (process exit) and the
    /// context torn down.
    pub fn is_released(&self) -> bool {
        self.binding.state.released.load(Ordering::Acquire)
    }

    /// Changes the fault-around window (power of two ≥ 4 KiB).
    pub fn set_fault_around(&self, bytes: u64) -> Result<(), GpuError> {
        if !bytes.is_power_of_two() || bytes < PAGE_SIZE {
            return Err(GpuError::Invalid(
                "fault-around must be a power of two ≥ 4 KiB",
            ));
        }
        self.binding
            .state
            .fault_around
            .store(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Installs a hook run between `range_fault` and the locked sequence
    /// check of every window pass.
    pub fn set_check_hook(&self, hook: Option<CheckHook>) {
        let s = &self.binding.state;
        let mut slot = s.hook.lock();
        s.has_hook.store(hook.is_some(), Ordering::Release);
        *slot = hook;
    }

    /// Installs a hook run by every [`DeviceMemory`](super::DeviceMemory)
    /// migration through this context, once per VMA, between collecting
    /// the pages and copying them.
    pub fn set_migrate_hook(&self, hook: Option<MigrateHook<M>>) {
        *self.binding.state.migrate_hook.lock() = hook;
    }

    pub(super) fn migrate_hook(&self) -> Option<MigrateHook<M>> {
        self.binding.state.migrate_hook.lock().clone()
    }

    /// The device's current translation of `va`.
    pub fn device_lookup(&self, va: u64) -> Option<Leaf> {
        self.binding.state.ctx.page_table().lookup(va)
    }

    /// Valid leaves in the device page table.
    pub fn device_leaves(&self) -> u64 {
        self.binding.state.ctx.page_table().leaf_count()
    }

    /// `range_snapshot` of `[start, end)` through this context's mirror,
    /// with entries of `1 << page_shift` bytes (12, or 21 in a huge VMA):
    /// the device-visible state of the range in one pass, without faulting.
    pub fn snapshot(&self, start: u64, end: u64, page_shift: u32) -> Result<Vec<SnapEntry>, Errno> {
        let mut range = HmmRange::new(FLAGS, VALUES, PFN_SHIFT);
        range.dev_private_owner = self.binding.state.owner();
        range_register(&mut range, &self.binding.mirror, start, end, page_shift)?;
        let r = loop {
            let r = {
                let mmap = mmap_read_lock(&*self.binding.state.mm);
                range_snapshot(&mut range, &mmap)
            };
            if r == Err(Errno::EAGAIN) {
                range_wait_until_valid(&range, 1000);
                continue;
            }
            break r;
        };
        let out = r.map(|_| {
            range
                .pfns
                .iter()
                .map(|&e| decode(&range, e))
                .collect::<Vec<_>>()
        });
        range_unregister(&mut range);
        out
    }
}

fn decode<M: Mm>(range: &HmmRange<M>, e: u64) -> SnapEntry {
    if e == VALUES[HmmPfnValue::None as usize] {
        SnapEntry::None
    } else if e == VALUES[HmmPfnValue::Special as usize] {
        SnapEntry::Special
    } else if range.entry_is_device_private(e) {
        SnapEntry::Device {
            vram: e >> PFN_SHIFT << PAGE_SHIFT,
            writable: range.entry_is_writable(e),
        }
    } else if let Some(pfn) = range.entry_to_pfn(e) {
        SnapEntry::Valid {
            phys: pfn << PAGE_SHIFT,
            writable: range.entry_is_writable(e),
        }
    } else {
        SnapEntry::Error
    }
}

impl<P: Platform, M: Mm> Drop for Binding<P, M> {
    fn drop(&mut self) {
        // No more faults reach us; then no more invalidations (unregister
        // waits for running callbacks). The context itself goes when the
        // last `SvmState` reference does: it cancels stalled work, drops the
        // TLB and frees the page table.
        self.state.ctx.set_fault_handler(None);
        crate::hmm::mirror_unregister(&mut self.mirror);
    }
}

impl<P: Platform, M: Mm> SvmState<P, M> {
    fn gpu(&self) -> &Arc<Gpu<P>> {
        self.ctx.gpu()
    }

    /// The owner HMM reports this context's own device-private and
    /// exclusive entries for: the attached memory's, else the exclusive
    /// one's.
    fn owner(&self) -> Option<DeviceOwner> {
        DeviceOwner::from_raw(self.dmem_owner.load(Ordering::Acquire)).or(self.exclusive_owner)
    }

    /// Whether `event` announces a migration of the attached device
    /// memory (to it or from it).
    fn own_migration(&self, event: MmuNotifyEvent) -> bool {
        let id = self.dmem_owner.load(Ordering::Acquire);
        matches!(event, MmuNotifyEvent::Migrate { owner: Some(o) } if id != 0 && o.get() == id)
    }

    /// Whether the device page table already satisfies each of `faults`
    /// (page, write): then they are stale (spurious, or queued while their
    /// window was serviced) and no first touch, so nothing may migrate for
    /// them — moving the window again could evict what its first service
    /// put in VRAM and move the pages that service left in system memory.
    fn device_satisfies(&self, faults: &[(u64, bool)]) -> bool {
        let pt = self.ctx.page_table();
        faults.iter().all(|&(va, write)| {
            pt.lookup(va)
                .is_some_and(|l| !write || l.perms.contains(Pte::WRITE))
        })
    }

    /// [`MigratePolicy::FirstTouch`]: move window `w` to the attached
    /// device memory before it is mapped (module docs: no lock held). What
    /// cannot move (VRAM full with nothing to evict, pages of another
    /// device) is mapped where it is; an error only logs, as the fault is
    /// still serviced from where the pages are.
    fn migrate_window(&self, w: &Window) {
        let Some(mem) = self.dmem.lock().clone() else {
            return;
        };
        let hook = self.migrate_hook.lock().clone();
        let ticks = || self.gpu().platform().stats_ticks();
        let t0 = ticks();
        let r = mem.migrate_on_fault(&self.mm, hook, w.start, w.end);
        let bytes = w.end - w.start;
        self.counters()
            .latency
            .record(Op::FaultMigrate, bytes, t0, ticks());
        if let Err(e) = r {
            log::debug!(
                "svm: first-touch migration of {:#x}..{:#x}: {e}",
                w.start,
                w.end
            );
        }
    }

    fn counters(&self) -> &DriverCounters {
        self.gpu().counters()
    }

    /// Clears every device leaf and fails stalled work (process exit).
    fn tear_down(&self) {
        self.released.store(true, Ordering::Release);
        self.density.lock().clear(0, faultline_abi::VA_LIMIT);
        let idx = self.ctx.index();
        {
            let mut pt = self.ctx.page_table();
            pt.clear();
            if let Err(e) = self.gpu().invalidate_context(idx) {
                log::warn!("svm: release of context {idx}: {e}");
            }
        }
        if let Err(e) = self
            .gpu()
            .control(faultline_abi::CtlOp::CancelContext, idx, 0, 0)
        {
            log::warn!("svm: cancel on release of context {idx}: {e}");
        }
    }
}

impl<P: Platform, M: Mm> HmmMirrorOps<M> for MirrorCallbacks<P, M> {
    fn sync_cpu_device_pagetables(&self, update: &HmmUpdate) -> Result<(), Errno> {
        let s = &self.0;
        let c = s.counters();
        DriverCounters::add(&c.invalidations, 1);
        let by_kind = match update.event {
            MmuNotifyEvent::Unmap => Some(&c.invalidations_unmap),
            MmuNotifyEvent::Clear => Some(&c.invalidations_clear),
            MmuNotifyEvent::ProtectionVma => Some(&c.invalidations_protect_vma),
            MmuNotifyEvent::ProtectionPage => Some(&c.invalidations_protect_page),
            MmuNotifyEvent::Migrate { .. } => Some(&c.invalidations_migrate),
            MmuNotifyEvent::Exclusive { owner: None } => Some(&c.exclusive_revocations),
            MmuNotifyEvent::Exclusive { owner: Some(_) } => None,
            MmuNotifyEvent::SoftDirty => None,
        };
        if let Some(k) = by_kind {
            DriverCounters::add(k, 1);
        }
        let len = update.end - update.start;
        s.gpu()
            .trace(TraceKind::Invalidate, s.ctx.index(), update.start, len);
        // Mutant (e): the range's leaves stay until the next fault service,
        // after the mm cleared its PTEs and freed the frames.
        #[cfg(feature = "mutants")]
        if update.event != MmuNotifyEvent::ProtectionPage && mutant::active(Mutant::UnmapAfterFree)
        {
            mutant::defer(s.ctx.index(), update.start, update.end);
            return Ok(());
        }
        let mut pt = if update.blockable {
            s.ctx.page_table()
        } else {
            s.ctx.page_table_try().ok_or(Errno::EAGAIN)?
        };
        if !update.blockable && pt.has_leaves(update.start, update.end) {
            // Waiting for the device's acknowledgement would block.
            return Err(Errno::EAGAIN);
        }
        // A write-protection keeps every frame mapped: downgrade the leaves
        // to read-only, so device reads go on without faulting. Anything
        // else may take read access or the frames away: clear. A migration
        // of this context's device memory moves the pages but keeps them
        // in use: the density marks stay.
        let cleared = if update.event == MmuNotifyEvent::ProtectionPage {
            pt.protect_range(update.start, update.end)
        } else {
            if matches!(s.prefetch, Prefetch::Density(_)) && !s.own_migration(update.event) {
                s.density.lock().clear(update.start, update.end);
            }
            pt.unmap_range(update.start, update.end)
        };
        // Mutant (d): downgraded leaves without a TLB invalidate leave the
        // device's cached writable translations of the range in use.
        #[cfg(feature = "mutants")]
        if update.event == MmuNotifyEvent::ProtectionPage && mutant::active(Mutant::MprotectNoFlush)
        {
            return Ok(());
        }
        if cleared.leaves > 0 {
            // Keep the update lock until the acknowledgement: an overlapping
            // invalidation that finds nothing left to change must not return
            // (and let its caller free frames, or write through the CPU
            // mapping alone) before this one is acked.
            if let Err(e) = s.ctx.invalidate(cleared.start, cleared.end - cleared.start) {
                log::error!(
                    "svm: TLB invalidate of {:#x}..{:#x}: {e}",
                    cleared.start,
                    cleared.end
                );
                return Err(Errno::EAGAIN);
            }
        }
        Ok(())
    }

    fn release(&self) {
        self.0.tear_down();
    }
}

/// One fault-around window of a batch: its pages share one VMA.
struct Window {
    start: u64,
    end: u64,
    shift: u32,
    /// Some fault of the window is a write the VMA allowed when planned:
    /// the window is faulted in writable where the VMA still allows it.
    write: bool,
    /// The VMA allowed writes when the window was planned.
    vma_write: bool,
    /// [`MigratePolicy::FirstTouch`] and a VMA whose pages may move to
    /// device memory (private and writable).
    migrate: bool,
    /// [`SvmConfig::exclusive_atomics`] and an atomic fault in a writable
    /// 4 KiB VMA: the window is taken exclusive before it is mapped.
    atomic: bool,
    /// The window's faults: `Scratch::faults[faults]` (page address, write).
    faults: core::ops::Range<usize>,
}

/// What a service call reuses from the previous one, so that servicing
/// allocates nothing once the vectors have grown: the batch's windows and
/// their faults, and the one `HmmRange` every window registers in turn.
struct Scratch<M: Mm> {
    windows: Vec<Window>,
    faults: Vec<(u64, bool)>,
    range: HmmRange<M>,
}

impl<M: Mm> Scratch<M> {
    fn new() -> Self {
        Scratch {
            windows: Vec::new(),
            faults: Vec::new(),
            range: HmmRange::new(FLAGS, VALUES, PFN_SHIFT),
        }
    }
}

impl<P: Platform, M: Mm> FaultHandler for SvmFaultHandler<P, M> {
    fn service(&self, faults: &[Fault], cancel: &mut Vec<u64>) {
        let Some(binding) = self.0.upgrade() else {
            cancel.extend(faults.iter().map(|f| f.va));
            return;
        };
        let s = &binding.state;
        if s.released.load(Ordering::Acquire) {
            cancel.extend(faults.iter().map(|f| f.va));
            return;
        }
        // Mutant (e): what the invalidations put off is cleared only now.
        #[cfg(feature = "mutants")]
        mutant::clear_deferred(&s.ctx);
        // One bottom half services a GPU's faults at a time, so the scratch
        // is normally free; a concurrent caller gets its own.
        let mut scratch = s
            .scratch
            .lock()
            .take()
            .unwrap_or_else(|| Box::new(Scratch::new()));
        if let [f] = faults {
            // The common batch, one fault: no plan. One mmap read lock
            // covers the VMA check and the window's first walk, and the
            // window's one fault lives on the stack.
            let mmap = mmap_read_lock(&*s.mm);
            if let Some(w) = s.window_of(&mmap, f, 0..1, cancel) {
                let one = [(f.va, f.access != Access::Read)];
                binding.service_window(&w, &one, &mut scratch.range, cancel, Some(mmap));
            }
        } else {
            s.plan(faults, &mut scratch, cancel);
            let Scratch {
                windows,
                faults: wfaults,
                range,
            } = &mut *scratch;
            for w in windows.iter() {
                binding.service_window(w, &wfaults[w.faults.clone()], range, cancel, None);
            }
        }
        *s.scratch.lock() = Some(scratch);
    }
}

impl<P: Platform, M: Mm> SvmState<P, M> {
    /// Plans the windows of a batch (sorted by page) under one short mmap
    /// read lock into `scratch`. Permissions are per fault: one the VMA can
    /// never satisfy (a write to a read-only mapping, say) is cancelled
    /// right here and takes nothing else in its window with it.
    fn plan(&self, faults: &[Fault], scratch: &mut Scratch<M>, cancel: &mut Vec<u64>) {
        let (windows, wfaults) = (&mut scratch.windows, &mut scratch.faults);
        windows.clear();
        wfaults.clear();
        let mmap = mmap_read_lock(&*self.mm);
        for f in faults {
            let write = f.access != Access::Read;
            if let Some(w) = windows.last_mut() {
                if f.va >= w.start && f.va < w.end {
                    if write && !w.vma_write {
                        cancel.push(f.va);
                    } else {
                        w.write |= write;
                        w.atomic |= self.exclusive_owner.is_some()
                            && f.access == Access::Atomic
                            && w.shift == PAGE_SHIFT;
                        // The window's faults are the last ones pushed.
                        wfaults.push((f.va, write));
                        w.faults.end = wfaults.len();
                    }
                    continue;
                }
            }
            let at = wfaults.len();
            if let Some(w) = self.window_of(&mmap, f, at..at + 1, cancel) {
                wfaults.push((f.va, write));
                windows.push(w);
            }
        }
    }

    /// The window of fault `f` (whose faults will be `faults`), or `None`
    /// with `f` cancelled when its VMA can never satisfy it.
    fn window_of(
        &self,
        mmap: &MmapReadGuard<'_, M>,
        f: &Fault,
        faults: core::ops::Range<usize>,
        cancel: &mut Vec<u64>,
    ) -> Option<Window> {
        let write = f.access != Access::Read;
        let Some(vma) = self.mm.vma_lookup(mmap, f.va) else {
            cancel.push(f.va);
            return None;
        };
        let vma_write = vma.flags.contains(VmFlags::WRITE);
        if !vma.flags.contains(VmFlags::READ)
            || (write && !vma_write)
            || vma.flags.intersects(VmFlags::SPECIAL_KINDS)
        {
            cancel.push(f.va);
            return None;
        }
        let huge = vma.flags.contains(VmFlags::HUGE);
        let around = self.fault_around.load(Ordering::Relaxed);
        let aligned = |size: u64| {
            let base = f.va & !(size - 1);
            (base, base.saturating_add(size))
        };
        let (start, end) = match self.prefetch {
            Prefetch::FaultAround if huge => aligned(around.max(LEAF_2M)),
            _ if huge => aligned(LEAF_2M),
            Prefetch::FaultAround => aligned(around),
            Prefetch::None => aligned(PAGE_SIZE),
            Prefetch::Density(pct) => self.density.lock().window(f.va, pct),
        };
        let (start, end) = (start.max(vma.start), end.min(vma.end));
        if let (false, Prefetch::Density(_)) = (huge, self.prefetch) {
            self.density.lock().mark(start, end);
        }
        let shift = if huge { PMD_SHIFT } else { PAGE_SHIFT };
        // Read-only mappings stay in system memory: the device never
        // writes them, so a copy buys nothing but a CPU fault back.
        let migrate = self.migrate == MigratePolicy::FirstTouch
            && vma_write
            && !vma.flags.contains(VmFlags::SHARED);
        let atomic = self.exclusive_owner.is_some() && f.access == Access::Atomic && !huge;
        Some(Window {
            start,
            end,
            shift,
            write,
            vma_write,
            migrate,
            atomic,
            faults,
        })
    }
}

/// Sets `range`'s request bits page by page: read everywhere, write where
/// the window writes and the page's VMA allows it.
fn request_per_page<M: Mm>(
    mm: &M,
    mmap: &MmapReadGuard<'_, M>,
    w: &Window,
    range: &mut HmmRange<M>,
) {
    range.default_flags = F_VALID;
    range.pfn_flags_mask = F_WRITE;
    let vma = mm.vma_lookup(mmap, w.start);
    for (i, req) in range.pfns.iter_mut().enumerate() {
        let va = w.start + ((i as u64) << w.shift);
        let vma_write = vma
            .as_ref()
            .is_some_and(|v| va >= v.start && va < v.end && v.flags.contains(VmFlags::WRITE));
        *req = if w.write && vma_write { F_WRITE } else { 0 };
    }
}

impl<P: Platform, M: Mm> Binding<P, M> {
    /// One window, the HMM driver pattern, on `range` (unregistered on entry
    /// and on return). `faults` are the window's (page, write). Faults it
    /// cannot satisfy go to `cancel`: all of them if the window could not
    /// be faulted in, else the writes whose page the device was not given
    /// writable (the VMA lost its write permission since the plan). Giving
    /// up after too many invalidations cancels nothing (the faults are
    /// replayed and come back). `held`: the mmap read lock the window was
    /// planned under, kept for its first walk (dropped first if the window
    /// migrates, which takes the lock itself).
    fn service_window<'m>(
        &'m self,
        w: &Window,
        faults: &[(u64, bool)],
        range: &mut HmmRange<M>,
        cancel: &mut Vec<u64>,
        mut held: Option<MmapReadGuard<'m, M>>,
    ) {
        let s = &self.state;
        let c = s.counters();
        DriverCounters::add(&c.windows, 1);
        if w.migrate {
            // Both take locks of their own: no other held.
            drop(held.take());
            if !s.device_satisfies(faults) {
                s.migrate_window(w);
            }
        }
        if let Err(e) = range_register(range, &self.mirror, w.start, w.end, w.shift) {
            log::debug!("svm: window {:#x}..{:#x}: {e}", w.start, w.end);
            cancel.extend(faults.iter().map(|f| f.0));
            return;
        }
        let mut result = Ok(());
        // A pass got as far as the device page table: `range.pfns` say
        // which pages the device was given writable.
        let mut mapped_pass = false;
        // Latencies (`gpu::stats`): one clock read at each end of a step.
        let now = || s.gpu().platform().stats_ticks();
        let bytes = w.end - w.start;
        let mut first_fault = None;
        let owner = s.owner();
        range.dev_private_owner = owner;
        for pass in 0..MAX_PASSES {
            if pass > 0 {
                DriverCounters::add(&c.retries, 1);
                s.gpu()
                    .trace(TraceKind::Retry, s.ctx.index(), w.start, bytes);
            }
            let t_fault = now();
            let start = *first_fault.get_or_insert(t_fault);
            let mmap = held.take().unwrap_or_else(|| mmap_read_lock(&*s.mm));
            let r = 'fault: {
                if let (true, Some(o)) = (w.atomic, owner) {
                    // Before the walk, so its read_begin follows this
                    // request's own invalidation; the pages it holds
                    // are valid for this mirror then.
                    if let Err(e) = make_device_exclusive(&mmap, w.start, w.end, o) {
                        break 'fault Err(e);
                    }
                }
                // Every page is asked for read, and for write if some fault
                // of the window writes: the plan saw its VMA allow that. If
                // the VMA lost write permission since (mprotect), the fault
                // fails with EPERM, and the pages are asked again one by
                // one, for write only where the VMA allows it, under the
                // same lock as the fault, so a read never fails for a write
                // the mapping refuses.
                range.default_flags = if w.write { F_VALID | F_WRITE } else { F_VALID };
                range.pfn_flags_mask = 0;
                match range_fault(range, &mmap, true) {
                    Err(Errno::EPERM) if w.write => {
                        request_per_page(&*s.mm, &mmap, w, range);
                    }
                    r => break 'fault r,
                }
                range_fault(range, &mmap, true)
            };
            // An atomic window keeps the mmap lock (taken before the update
            // lock, as a migration does) to ask each page's CPU entry under
            // the update lock: a revoke cannot finish while that is held,
            // and one begun after the walk fails the sequence check.
            let mmap = if w.atomic {
                Some(mmap)
            } else {
                drop(mmap);
                None
            };
            let t_faulted = now();
            c.latency.record(Op::RangeFault, bytes, t_fault, t_faulted);
            match r {
                Ok(_) => {}
                Err(Errno::EAGAIN) => {
                    range_wait_until_valid(range, 1000);
                    continue;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            let hook = match s.has_hook.load(Ordering::Acquire) {
                true => s.hook.lock().clone(),
                false => None,
            };
            let t_lock = match hook {
                Some(h) => {
                    h(w.start, w.end);
                    now()
                }
                None => t_faulted,
            };
            let mut pt = s.ctx.page_table();
            let valid = range_check_seq(range);
            // Mutant (b): pfns an invalidation made stale after `range_fault`
            // are mapped anyway.
            #[cfg(feature = "mutants")]
            let valid = valid || mutant::active(Mutant::NoSeqCheck);
            if !valid {
                continue;
            }
            mapped_pass = true;
            let size = if w.shift == PMD_SHIFT {
                PageSize::Size2M
            } else {
                PageSize::Size4K
            };
            let pfns = &range.pfns;
            // 2 MiB pages are never exclusive: they keep the coherent path.
            let coherent_atomics = s.exclusive_owner.is_none() || w.shift != PAGE_SHIFT;
            let mut granted = 0;
            let leaf = |i: usize| {
                let e = pfns[i];
                // Decoded once: the flag bits are this driver's own
                // (`FLAGS`), meaningful on an entry with a pfn.
                if e & F_VALID == 0 {
                    return None;
                }
                let pfn = e >> PFN_SHIFT;
                let mut perms = Pte::empty();
                let vram = e & F_DEVICE_PRIVATE != 0;
                if e & F_WRITE != 0 {
                    perms |= Pte::WRITE;
                    let held = |m: &MmapReadGuard<'_, M>| {
                        let va = w.start + ((i as u64) << w.shift);
                        matches!(
                            s.mm.walk(m, va).state,
                            PageState::Exclusive { owner: o, .. } if Some(o) == owner
                        )
                    };
                    if coherent_atomics || vram {
                        perms |= Pte::ATOMIC;
                    } else if mmap.as_ref().is_some_and(held) {
                        perms |= Pte::ATOMIC;
                        granted += 1;
                    }
                }
                if vram {
                    perms |= Pte::VRAM;
                }
                // Mutant (c): a write anywhere in the window makes every page
                // of it writable, read-only pfns too.
                #[cfg(feature = "mutants")]
                let perms = if w.write && mutant::active(Mutant::StrongestAccess) {
                    Pte::WRITE | Pte::ATOMIC
                } else {
                    perms
                };
                Some((pfn << PAGE_SHIFT, perms))
            };
            let (mapped, r) = pt.map_run(w.start, pfns.len(), size, leaf);
            if let Err(err) = r {
                log::error!("svm: device map in {:#x}..{:#x}: {err}", w.start, w.end);
                result = Err(Errno::ENOMEM);
            }
            drop(pt);
            drop(mmap);
            DriverCounters::add(&c.pages_mapped, mapped);
            DriverCounters::add(&c.exclusive_grants, granted);
            if result.is_ok() {
                let t_mapped = now();
                c.latency.record(Op::PteWrite, bytes, t_lock, t_mapped);
                c.latency.record(Op::Window, bytes, start, t_mapped);
            }
            break;
        }
        range_unregister(range);
        s.gpu()
            .trace(TraceKind::WindowServiced, s.ctx.index(), w.start, bytes);
        match result {
            Err(e) => {
                log::debug!("svm: window {:#x}..{:#x}: {e}", w.start, w.end);
                cancel.extend(faults.iter().map(|f| f.0));
            }
            // When every pass was invalidated nothing is cancelled: the
            // replay brings the faults back.
            Ok(()) if mapped_pass => {
                for &(va, write) in faults {
                    let i = ((va - w.start) >> w.shift) as usize;
                    let given = range
                        .pfns
                        .get(i)
                        .is_some_and(|&e| e & (F_VALID | F_WRITE) == F_VALID | F_WRITE);
                    if write && !given {
                        cancel.push(va);
                    }
                }
            }
            Ok(()) => {}
        }
    }
}
