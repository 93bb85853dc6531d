//! A simulated address space: an [`Mm`] on host threads, for unit tests, the
//! bench and the host loopback tests. Feature `sim`; uses std.
//!
//! It behaves like an anonymous-memory Linux mm as far as HMM can tell:
//! a read fault on an untouched page maps the shared zero page read-only, a
//! write fault allocates a frame (copy-on-write from the zero page, announced
//! through the notifier chain), mprotect/munmap/reclaim bracket their PTE
//! changes with `invalidate_range_start/end` and free frames only after
//! `_end`. Frames are never reused, so a device mapping of a freed frame is
//! detectable forever ([`SimMm::is_freed`], [`SimMm::set_free_hook`]).
//!
//! HUGE VMAs are populated with 2 MiB leaves only (any fault allocates a
//! writable-if-allowed leaf; there is no huge zero page).
//!
//! [`SimMm::fork`] copies the address space: private pages copy-on-write
//! (a write fault copies a frame another PTE still maps, 2 MiB as a unit),
//! shared mappings populated and shared, device pages back first; frames
//! a forked family shares carry extra references, and a free drops one of
//! those before it frees anything (`fork.rs`).
//!
//! Frames come from a [`FrameSource`]. The default one hands out frame
//! numbers that are never reused and keeps page contents in host memory;
//! host loopback tests plug in one that carves frames out of the device's
//! guest memory, so the GPU can DMA the pages the CPU side sees through
//! [`SimMm::read`] / [`SimMm::write`].
//!
//! Here: [`SimMm`], its [`Mm`] implementation (walk, fault handler, exit)
//! and frame accounting. `process.rs`: what the process does (mmap, munmap,
//! mprotect, reclaim, CPU accesses); `fork.rs`: fork and copy-on-write;
//! `pt.rs`: the page table; `vmas.rs`: the VMA tree; `frames.rs`: frame
//! sources and the family's shared-frame references.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use std::vec::Vec;

use faultline_abi::CpuRoot;
use lock_api::RwLock;
use parking_lot::Mutex;

use crate::mm::exclusive::exclusive_entry_restore;
use crate::mm::migrate::{device_private_fault, migration_entry_wait};
use crate::mm::{
    device_page_free, mmput, mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start, FaultError, FaultFlags, Mm, MmCore, MmapReadGuard,
    MmuNotifierRange, MmuNotifyEvent, PageState, VmFlags, Vma, Walk, PAGE_SHIFT, PAGE_SIZE,
    PMD_SHIFT,
};

mod fork;
mod frames;
mod process;
mod pt;
mod vmas;

pub use frames::{FrameSource, HostFrames, ZERO_PFN};
pub use vmas::SimVmas;

use frames::{Frames, SharedFrames};
use pt::{pte_index, table_mut, zap, Pmd, SimPte, PTRS};

type FreeHook = Arc<dyn Fn(u64) + Send + Sync>;
type FaultHook = Arc<dyn Fn(&SimMm, u64) + Send + Sync>;

/// The simulated address space.
pub struct SimMm {
    core: MmCore<SimMm>,
    mmap: RwLock<parking_lot::RawRwLock, SimVmas>,
    /// The page-table lock; never held while calling notifiers or hooks.
    pt: Mutex<HashMap<u64, Pmd>>,
    frames: Mutex<Frames>,
    source: Arc<dyn FrameSource>,
    /// Extra references of the frames this mm's forked family shares.
    shared: Arc<SharedFrames>,
    free_hook: Mutex<Option<FreeHook>>,
    fault_hook: Mutex<Option<FaultHook>>,
    inject: Mutex<HashMap<u64, FaultError>>,
    dead: AtomicBool,
    broken_faults: AtomicBool,
    faults: AtomicU64,
    epoch: Instant,
    /// Names this mm in its contexts' `cpu_root` word.
    id: u32,
}

/// What a zap took out of the page table, to free after `_end`.
#[derive(Default)]
struct Zapped {
    frames: Vec<u64>,
    devs: Vec<pt::ZappedDev>,
}

/// Source of [`SimMm`] ids (0 would read as "no CPU table").
static NEXT_ID: AtomicU32 = AtomicU32::new(1);

impl Mm for SimMm {
    type RawMutex = parking_lot::RawMutex;
    type RawRwLock = parking_lot::RawRwLock;
    type MmapData = SimVmas;

    fn mmap_lock(&self) -> &RwLock<parking_lot::RawRwLock, SimVmas> {
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
        self.pt_walk(addr)
    }

    fn walk_ptes(
        &self,
        _mmap: &MmapReadGuard<'_, Self>,
        addr: u64,
        out: &mut [PageState],
    ) -> usize {
        let pt = self.pt.lock();
        let Some(Pmd::Table(t)) = pt.get(&(addr >> PMD_SHIFT)) else {
            return 0;
        };
        let first = pte_index(addr);
        let n = out.len().min(PTRS - first);
        for (slot, pte) in out[..n].iter_mut().zip(&t[first..]) {
            *slot = self.pte_state(*pte);
        }
        n
    }

    fn cpu_root(&self) -> CpuRoot {
        // Not an x86 table: the loopback's checker resolves the id through
        // `SimMm::cpu_translation` (ids stay far below the word's 2^28).
        CpuRoot::x86_64(u64::from(self.id) << PAGE_SHIFT).unwrap_or(CpuRoot::NONE)
    }

    fn handle_mm_fault(
        &self,
        mmap: &MmapReadGuard<'_, Self>,
        addr: u64,
        flags: FaultFlags,
    ) -> Result<(), FaultError> {
        if self.dead.load(Ordering::Acquire) {
            return Err(FaultError::Sigsegv);
        }
        let vma = mmap.lookup(addr).ok_or(FaultError::Sigsegv)?;
        let write = flags.contains(FaultFlags::WRITE);
        if !vma.flags.contains(VmFlags::READ) || (write && !vma.flags.contains(VmFlags::WRITE)) {
            return Err(FaultError::Sigsegv);
        }
        if vma.flags.intersects(VmFlags::SPECIAL_KINDS) {
            return Err(FaultError::Sigbus);
        }
        let injected = self.inject.lock().remove(&(addr & !(PAGE_SIZE - 1)));
        match injected {
            Some(FaultError::Retry) if !flags.contains(FaultFlags::ALLOW_RETRY) => {}
            Some(e) => return Err(e),
            None => {}
        }
        let hook = self.fault_hook.lock().clone();
        if let Some(hook) = hook {
            hook(self, addr);
        }
        self.faults.fetch_add(1, Ordering::Relaxed);
        if self.broken_faults.load(Ordering::Relaxed) {
            return Ok(());
        }

        // A shared VMA's read-only page (after an mprotect round trip)
        // only upgrades: copying it would unshare the mapping.
        let cow = !vma.flags.contains(VmFlags::SHARED);
        if vma.flags.contains(VmFlags::HUGE) {
            let mut pt = self.pt.lock();
            let pmd = pt.entry(addr >> PMD_SHIFT);
            let vma_write = vma.flags.contains(VmFlags::WRITE);
            match pmd {
                std::collections::hash_map::Entry::Vacant(v) => {
                    let pfn = self.alloc(PTRS as u64).ok_or(FaultError::Oom)?;
                    v.insert(Pmd::Huge {
                        pfn,
                        writable: vma_write,
                    });
                }
                std::collections::hash_map::Entry::Occupied(mut o) => match o.get_mut() {
                    Pmd::Huge { pfn, writable } => {
                        if write && !*writable && cow && self.shared.is_shared(*pfn) {
                            let old = *pfn;
                            drop(pt);
                            return self.cow_break(addr, old, true);
                        }
                        // Permission upgrade: no notifier (nothing a device
                        // holds becomes wrong).
                        *writable |= write && vma_write;
                    }
                    Pmd::DevicePrivate { .. } => {
                        drop(pt);
                        return device_private_fault(mmap, addr, flags);
                    }
                    Pmd::Migration => {
                        drop(pt);
                        return migration_entry_wait(mmap, addr, flags);
                    }
                    Pmd::Table(_) => {}
                },
            }
            return Ok(());
        }

        let mut pt = self.pt.lock();
        let table = table_mut(&mut pt, addr);
        let pte = &mut table[pte_index(addr)];
        match *pte {
            SimPte::None => {
                *pte = if write {
                    SimPte::Page {
                        pfn: self.alloc(1).ok_or(FaultError::Oom)?,
                        writable: true,
                    }
                } else {
                    SimPte::Zero
                };
            }
            SimPte::Page {
                pfn,
                writable: false,
            } if write => {
                if cow && self.shared.is_shared(pfn) {
                    drop(pt);
                    return self.cow_break(addr, pfn, false);
                }
                *pte = SimPte::Page {
                    pfn,
                    writable: true,
                };
            }
            SimPte::Zero if write => {
                drop(pt);
                self.cow_zero_page(addr)?;
            }
            SimPte::DevicePrivate { .. } => {
                drop(pt);
                device_private_fault(mmap, addr, flags)?;
            }
            SimPte::Migration => {
                drop(pt);
                migration_entry_wait(mmap, addr, flags)?;
            }
            SimPte::Exclusive { .. } => {
                drop(pt);
                exclusive_entry_restore(mmap, addr);
                return self.handle_mm_fault(mmap, addr, flags);
            }
            SimPte::Page { .. } | SimPte::Zero | SimPte::Special => {}
        }
        Ok(())
    }

    fn exit_mmap(&self) {
        self.dead.store(true, Ordering::Release);
        let zapped = self.zap_pt(0, u64::MAX);
        self.free_zapped(zapped);
    }

    fn pte_exchange(
        &self,
        _mmap: &MmapReadGuard<'_, Self>,
        addr: u64,
        old: PageState,
        new: PageState,
    ) -> Result<(), PageState> {
        let new_pte = match new {
            PageState::None => SimPte::None,
            PageState::Zero { .. } => SimPte::Zero,
            PageState::Present { pfn, writable } => SimPte::Page { pfn, writable },
            PageState::DevicePrivate {
                owner,
                vram_pfn,
                writable,
                huge: false,
            } => SimPte::DevicePrivate {
                owner,
                vram_pfn,
                writable,
            },
            PageState::Migration => SimPte::Migration,
            PageState::Exclusive {
                owner,
                pfn,
                writable,
            } => SimPte::Exclusive {
                owner,
                pfn,
                writable,
            },
            PageState::Huge { .. } | PageState::Special | PageState::DevicePrivate { .. } => {
                return Err(self.pt_walk(addr).state)
            }
        };
        let mut pt = self.pt.lock();
        if let Some(pmd) = pt
            .get(&(addr >> PMD_SHIFT))
            .filter(|p| !matches!(p, Pmd::Table(_)))
        {
            return Err(self.pmd_state(pmd));
        }
        let pte = &mut table_mut(&mut pt, addr)[pte_index(addr)];
        let cur = self.pte_state(*pte);
        if cur != old {
            return Err(cur);
        }
        let was_device = matches!(*pte, SimPte::DevicePrivate { .. });
        *pte = new_pte;
        self.core.account_device_pages(
            matches!(new_pte, SimPte::DevicePrivate { .. }).into(),
            was_device.into(),
        );
        Ok(())
    }

    fn pmd_exchange(
        &self,
        _mmap: &MmapReadGuard<'_, Self>,
        addr: u64,
        old: PageState,
        new: PageState,
    ) -> Result<(), PageState> {
        let new_pmd = match new {
            PageState::None => None,
            PageState::Huge { pfn, writable } => Some(Pmd::Huge { pfn, writable }),
            PageState::DevicePrivate {
                owner,
                vram_pfn,
                writable,
                huge: true,
            } => Some(Pmd::DevicePrivate {
                owner,
                vram_pfn,
                writable,
            }),
            PageState::Migration => Some(Pmd::Migration),
            _ => return Err(self.pt_walk(addr).state),
        };
        let key = addr >> PMD_SHIFT;
        let mut pt = self.pt.lock();
        let cur = match pt.get(&key) {
            None => PageState::None,
            Some(Pmd::Table(_)) => {
                return Err(self.pte_state(table_mut(&mut pt, addr)[pte_index(addr)]))
            }
            Some(pmd) => self.pmd_state(pmd),
        };
        if cur != old {
            return Err(cur);
        }
        let dev =
            |s: PageState| u64::from(matches!(s, PageState::DevicePrivate { .. })) * PTRS as u64;
        match new_pmd {
            Some(p) => pt.insert(key, p),
            None => pt.remove(&key),
        };
        self.core.account_device_pages(dev(new), dev(old));
        Ok(())
    }

    fn alloc_frame(&self) -> Option<u64> {
        self.alloc(1)
    }

    fn free_frame(&self, pfn: u64) {
        self.free(std::vec![pfn]);
    }

    fn alloc_huge_frame(&self) -> Option<u64> {
        self.alloc(PTRS as u64)
    }

    fn free_huge_frame(&self, pfn: u64) {
        self.free((pfn..pfn + PTRS as u64).collect());
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn cpu_relax(&self) {
        // Host threads on a 2-core machine: yield rather than spin.
        std::thread::yield_now();
    }

    fn frame_shared(&self, pfn: u64) -> bool {
        self.shared.is_shared(pfn)
    }
}

impl SimMm {
    fn pte_state(&self, pte: SimPte) -> PageState {
        match pte {
            SimPte::None => PageState::None,
            SimPte::Page { pfn, writable } => PageState::Present { pfn, writable },
            SimPte::Zero => PageState::Zero {
                pfn: self.source.zero_pfn(),
            },
            SimPte::Special => PageState::Special,
            SimPte::DevicePrivate {
                owner,
                vram_pfn,
                writable,
            } => PageState::DevicePrivate {
                owner,
                vram_pfn,
                writable,
                huge: false,
            },
            SimPte::Migration => PageState::Migration,
            SimPte::Exclusive {
                owner,
                pfn,
                writable,
            } => PageState::Exclusive {
                owner,
                pfn,
                writable,
            },
        }
    }

    /// What a 2 MiB entry (not a table) says.
    fn pmd_state(&self, pmd: &Pmd) -> PageState {
        match *pmd {
            Pmd::Huge { pfn, writable } => PageState::Huge { pfn, writable },
            Pmd::DevicePrivate {
                owner,
                vram_pfn,
                writable,
            } => PageState::DevicePrivate {
                owner,
                vram_pfn,
                writable,
                huge: true,
            },
            Pmd::Migration => PageState::Migration,
            // Not an entry: the walk looks inside.
            Pmd::Table(_) => PageState::None,
        }
    }

    /// Clear `[start, end)` in the page table (the caller brackets it with
    /// notifiers and frees what it returns after `_end`).
    fn zap_pt(&self, start: u64, end: u64) -> Zapped {
        let mut devs = Vec::new();
        let frames = zap(&mut self.pt.lock(), start, end, &mut devs);
        let pages = devs
            .iter()
            .map(|&(_, _, huge)| if huge { PTRS as u64 } else { 1 })
            .sum();
        self.core.account_device_pages(0, pages);
        Zapped { frames, devs }
    }

    /// Give back what a zap took out: frames to the source, device pages
    /// to their owners.
    fn free_zapped(&self, z: Zapped) {
        self.free(z.frames);
        for (owner, vram_pfn, huge) in z.devs {
            device_page_free(self, owner, vram_pfn, huge);
        }
    }

    /// One address's translation under the page-table lock alone (no mmap
    /// lock: a device checking itself calls this while a munmap holding the
    /// mmap lock waits for that device).
    fn pt_walk(&self, addr: u64) -> Walk {
        let pt = self.pt.lock();
        let state = match pt.get(&(addr >> PMD_SHIFT)) {
            None => {
                return Walk {
                    state: PageState::None,
                    shift: PMD_SHIFT,
                }
            }
            Some(Pmd::Table(t)) => self.pte_state(t[pte_index(addr)]),
            Some(pmd) => {
                return Walk {
                    state: self.pmd_state(pmd),
                    shift: PMD_SHIFT,
                }
            }
        };
        Walk {
            state,
            shift: PAGE_SHIFT,
        }
    }

    /// A fresh, empty address space with one user (its process).
    pub fn new() -> Arc<SimMm> {
        Self::with_frames(Arc::new(HostFrames::default()))
    }

    /// A fresh, empty address space whose frames come from `source`.
    pub fn with_frames(source: Arc<dyn FrameSource>) -> Arc<SimMm> {
        Self::with_family(source, Arc::default())
    }

    /// An empty address space in the forked family of `shared`.
    fn with_family(source: Arc<dyn FrameSource>, shared: Arc<SharedFrames>) -> Arc<SimMm> {
        Arc::new(SimMm {
            core: MmCore::new(),
            mmap: RwLock::new(SimVmas::default()),
            pt: Mutex::new(HashMap::new()),
            frames: Mutex::new(Frames {
                freed: HashSet::new(),
                in_use: 0,
            }),
            source,
            shared,
            free_hook: Mutex::new(None),
            fault_hook: Mutex::new(None),
            inject: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
            broken_faults: AtomicBool::new(false),
            faults: AtomicU64::new(0),
            epoch: Instant::now(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    fn alloc(&self, count: u64) -> Option<u64> {
        let pfn = self.source.alloc(count)?;
        let mut f = self.frames.lock();
        f.in_use += count;
        for p in pfn..pfn + count {
            f.freed.remove(&p);
        }
        Some(pfn)
    }

    /// This mm lets go of `pfns`: a frame another PTE of the family still
    /// maps only loses a reference; the others go back to the source.
    fn free(&self, pfns: Vec<u64>) {
        if pfns.is_empty() {
            return;
        }
        let dropped = pfns.len() as u64;
        let pfns: Vec<u64> = pfns
            .into_iter()
            .filter(|&p| !self.shared.drop_ref(p))
            .collect();
        {
            let mut f = self.frames.lock();
            f.in_use -= dropped;
            f.freed.extend(pfns.iter().copied());
        }
        for &pfn in &pfns {
            self.source.free(pfn);
        }
        let hook = self.free_hook.lock().clone();
        if let Some(hook) = hook {
            for pfn in pfns {
                hook(pfn);
            }
        }
    }

    fn cow_zero_page(&self, addr: u64) -> Result<(), FaultError> {
        let page = addr & !(PAGE_SIZE - 1);
        let r = MmuNotifierRange {
            start: page,
            end: page + PAGE_SIZE,
            event: MmuNotifyEvent::Clear,
            blockable: true,
        };
        mmu_notifier_invalidate_range_start(self, &r).expect("blockable");
        let mut result = Ok(());
        {
            let mut pt = self.pt.lock();
            let pte = &mut table_mut(&mut pt, page)[pte_index(page)];
            // Re-check: another thread may have resolved it meanwhile.
            if *pte == SimPte::Zero {
                match self.alloc(1) {
                    Some(pfn) => {
                        *pte = SimPte::Page {
                            pfn,
                            writable: true,
                        }
                    }
                    None => result = Err(FaultError::Oom),
                }
            }
        }
        mmu_notifier_invalidate_range_end(self, &r);
        result
    }

    /// The frame source.
    pub fn frame_source(&self) -> &Arc<dyn FrameSource> {
        &self.source
    }

    /// Whether `pfn` was handed out and freed since (frames are never reused).
    pub fn is_freed(&self, pfn: u64) -> bool {
        self.frames.lock().freed.contains(&pfn)
    }

    /// Frames currently allocated.
    pub fn frames_in_use(&self) -> u64 {
        self.frames.lock().in_use
    }

    /// Device-private entries in the page table (pages living in device
    /// memory).
    pub fn device_pages(&self) -> u64 {
        self.core.device_pages()
    }

    /// Faults resolved by `handle_mm_fault` so far.
    pub fn fault_count(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    /// Called for every frame right after it is freed (after
    /// `invalidate_range_end`), without any sim lock held.
    pub fn set_free_hook(&self, hook: Option<FreeHook>) {
        *self.free_hook.lock() = hook;
    }

    /// Called at the start of every `handle_mm_fault` that will resolve a
    /// fault (mmap lock held for read, no other sim lock): lets tests run an
    /// invalidation "during" a fault deterministically.
    pub fn set_fault_hook(&self, hook: Option<FaultHook>) {
        *self.fault_hook.lock() = hook;
    }

    /// Make the next fault on the page of `addr` fail with `err` (one shot).
    /// `Retry` only fires when the fault allows retry; otherwise the fault
    /// "blocks" and succeeds.
    pub fn inject_fault(&self, addr: u64, err: FaultError) {
        self.inject.lock().insert(addr & !(PAGE_SIZE - 1), err);
    }

    /// Make `handle_mm_fault` report success without mapping anything (a
    /// broken `Mm`, to test that HMM does not loop forever on one).
    pub fn set_broken_fault_handler(&self, broken: bool) {
        self.broken_faults.store(broken, Ordering::Relaxed);
    }

    /// The process exits: drop its users reference (`mmput`).
    pub fn exit(&self) {
        mmput(self);
    }

    /// Whether `exit_mmap` ran.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }
}

/// Records every invalidation's range and event (`_start` only), for
/// tests of what an operation announces.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Spy(pub(crate) Mutex<Vec<(u64, u64, MmuNotifyEvent)>>);

#[cfg(test)]
impl crate::mm::MmuNotifier<SimMm> for Spy {
    fn invalidate_range_start(
        &self,
        _: &SimMm,
        r: &MmuNotifierRange,
    ) -> Result<(), crate::errno::Errno> {
        self.0.lock().push((r.start, r.end, r.event));
        Ok(())
    }
    fn invalidate_range_end(&self, _: &SimMm, _: &MmuNotifierRange) {}
    fn release(&self, _: &SimMm) {}
}
