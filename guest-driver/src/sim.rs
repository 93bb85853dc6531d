//! A simulated address space: an [`Mm`] on host threads, for unit tests, the
//! bench and (later) host loopback tests. Feature `sim`; uses std.
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
//! Frames come from a [`FrameSource`]. The default one hands out frame
//! numbers that are never reused and keeps page contents in host memory;
//! host loopback tests plug in one that carves frames out of the device's
//! guest memory, so the GPU can DMA the pages the CPU side sees through
//! [`SimMm::read`] / [`SimMm::write`].

use std::boxed::Box;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use std::vec::Vec;

use lock_api::RwLock;
use parking_lot::Mutex;

use crate::errno::Errno;
use crate::mm::{
    mmap_read_lock, mmap_write_lock, mmput, mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start, FaultError, FaultFlags, Mm, MmCore, MmapReadGuard,
    MmuNotifierRange, MmuNotifyEvent, PageState, VmFlags, Vma, Walk, PAGE_SHIFT, PAGE_SIZE,
    PMD_SHIFT, PMD_SIZE,
};

/// The zero page's frame with the default [`FrameSource`].
pub const ZERO_PFN: u64 = 0x10;
/// First frame handed out by the allocator (2 MiB aligned).
const FIRST_PFN: u64 = 0x1000;
const PTRS: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SimPte {
    None,
    Page { pfn: u64, writable: bool },
    Zero,
    Special,
}

enum Pmd {
    Table(Box<[SimPte; PTRS]>),
    Huge { pfn: u64, writable: bool },
}

/// What the simulated mmap lock protects: the VMA tree.
#[derive(Default)]
pub struct SimVmas {
    vmas: BTreeMap<u64, Vma>,
}

impl SimVmas {
    fn lookup(&self, addr: u64) -> Option<Vma> {
        self.vmas
            .range(..=addr)
            .next_back()
            .map(|(_, v)| *v)
            .filter(|v| v.contains(addr))
    }

    /// Split VMAs so that `start` and `end` are VMA boundaries.
    fn split_at(&mut self, addr: u64) {
        if let Some(v) = self.lookup(addr) {
            if v.start < addr {
                self.vmas.insert(v.start, Vma { end: addr, ..v });
                self.vmas.insert(addr, Vma { start: addr, ..v });
            }
        }
    }

    fn overlapping(&self, start: u64, end: u64) -> Vec<Vma> {
        self.vmas
            .values()
            .filter(|v| v.start < end && start < v.end)
            .copied()
            .collect()
    }
}

struct Frames {
    freed: HashSet<u64>,
    in_use: u64,
}

/// Where the simulated address space gets its page frames, and how the CPU
/// side reaches their bytes.
pub trait FrameSource: Send + Sync {
    /// `count` (1 or 512) zeroed frames, naturally aligned; the first pfn.
    /// `None` when memory is exhausted (the fault fails with `Oom`).
    fn alloc(&self, count: u64) -> Option<u64>;
    /// Returns one frame.
    fn free(&self, pfn: u64);
    /// The shared zero page (never allocated or freed).
    fn zero_pfn(&self) -> u64;
    /// Reads `out.len()` bytes at byte `offset` of frame `pfn`.
    fn read(&self, pfn: u64, offset: usize, out: &mut [u8]);
    /// Writes `data` at byte `offset` of frame `pfn`.
    fn write(&self, pfn: u64, offset: usize, data: &[u8]);
    /// Atomically adds `v` to the naturally aligned u64 at `offset` of frame
    /// `pfn`; returns the old value.
    fn atomic_add_u64(&self, pfn: u64, offset: usize, v: u64) -> u64;
}

/// The default source: frame numbers from [`ZERO_PFN`]` + ...`, never
/// reused, contents in a host map (created on first write).
#[derive(Default)]
pub struct HostFrames {
    next: Mutex<u64>,
    data: Mutex<HashMap<u64, Box<[u8; PAGE_SIZE as usize]>>>,
}

impl FrameSource for HostFrames {
    fn alloc(&self, count: u64) -> Option<u64> {
        let mut next = self.next.lock();
        // Huge leaves need naturally aligned frames.
        let pfn = (*next).max(FIRST_PFN).next_multiple_of(count);
        *next = pfn + count;
        Some(pfn)
    }
    fn free(&self, pfn: u64) {
        self.data.lock().remove(&pfn);
    }
    fn zero_pfn(&self) -> u64 {
        ZERO_PFN
    }
    fn read(&self, pfn: u64, offset: usize, out: &mut [u8]) {
        match self.data.lock().get(&pfn) {
            Some(page) => out.copy_from_slice(&page[offset..offset + out.len()]),
            None => out.fill(0),
        }
    }
    fn write(&self, pfn: u64, offset: usize, data: &[u8]) {
        assert_ne!(pfn, ZERO_PFN, "sim: write to the zero page");
        let mut map = self.data.lock();
        let page = map
            .entry(pfn)
            .or_insert_with(|| Box::new([0; PAGE_SIZE as usize]));
        page[offset..offset + data.len()].copy_from_slice(data);
    }
    fn atomic_add_u64(&self, pfn: u64, offset: usize, v: u64) -> u64 {
        let mut b = [0u8; 8];
        // One lock across the read-modify-write.
        let mut map = self.data.lock();
        let page = map
            .entry(pfn)
            .or_insert_with(|| Box::new([0; PAGE_SIZE as usize]));
        b.copy_from_slice(&page[offset..offset + 8]);
        let old = u64::from_le_bytes(b);
        page[offset..offset + 8].copy_from_slice(&old.wrapping_add(v).to_le_bytes());
        old
    }
}

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
    free_hook: Mutex<Option<FreeHook>>,
    fault_hook: Mutex<Option<FaultHook>>,
    inject: Mutex<HashMap<u64, FaultError>>,
    dead: AtomicBool,
    broken_faults: AtomicBool,
    faults: AtomicU64,
    epoch: Instant,
}

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

    fn walk(&self, _mmap: &MmapReadGuard<'_, Self>, addr: u64) -> Walk {
        let pt = self.pt.lock();
        let state = match pt.get(&(addr >> PMD_SHIFT)) {
            None => {
                return Walk {
                    state: PageState::None,
                    shift: PMD_SHIFT,
                }
            }
            Some(Pmd::Huge { pfn, writable }) => {
                return Walk {
                    state: PageState::Huge {
                        pfn: *pfn,
                        writable: *writable,
                    },
                    shift: PMD_SHIFT,
                }
            }
            Some(Pmd::Table(t)) => match t[pte_index(addr)] {
                SimPte::None => PageState::None,
                SimPte::Page { pfn, writable } => PageState::Present { pfn, writable },
                SimPte::Zero => PageState::Zero {
                    pfn: self.source.zero_pfn(),
                },
                SimPte::Special => PageState::Special,
            },
        };
        Walk {
            state,
            shift: PAGE_SHIFT,
        }
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
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    if let Pmd::Huge { writable, .. } = o.get_mut() {
                        // Permission upgrade: no notifier (nothing a device
                        // holds becomes wrong).
                        *writable |= write && vma_write;
                    }
                }
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
                *pte = SimPte::Page {
                    pfn,
                    writable: true,
                };
            }
            SimPte::Zero if write => {
                drop(pt);
                self.cow_zero_page(addr)?;
            }
            SimPte::Page { .. } | SimPte::Zero | SimPte::Special => {}
        }
        Ok(())
    }

    fn exit_mmap(&self) {
        self.dead.store(true, Ordering::Release);
        let freed = zap(&mut self.pt.lock(), 0, u64::MAX);
        self.free(freed);
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn cpu_relax(&self) {
        // Host threads on a 2-core machine: yield rather than spin.
        std::thread::yield_now();
    }
}

fn pte_index(addr: u64) -> usize {
    ((addr >> PAGE_SHIFT) as usize) % PTRS
}

fn table_mut(pt: &mut HashMap<u64, Pmd>, addr: u64) -> &mut [SimPte; PTRS] {
    let pmd = pt
        .entry(addr >> PMD_SHIFT)
        .or_insert_with(|| Pmd::Table(Box::new([SimPte::None; PTRS])));
    match pmd {
        Pmd::Table(t) => t,
        Pmd::Huge { .. } => panic!("sim: 4 KiB operation on a huge leaf at {addr:#x}"),
    }
}

/// Clear every translation in `[start, end)`; returns the frames to free.
fn zap(pt: &mut HashMap<u64, Pmd>, start: u64, end: u64) -> Vec<u64> {
    let mut freed = Vec::new();
    let keys: Vec<u64> = pt
        .keys()
        .copied()
        .filter(|&k| {
            let (b, e) = (k << PMD_SHIFT, (k << PMD_SHIFT) + PMD_SIZE);
            b < end && start < e
        })
        .collect();
    for k in keys {
        let base = k << PMD_SHIFT;
        let remove = match pt.get_mut(&k).expect("key just listed") {
            Pmd::Huge { pfn, .. } => {
                freed.extend(*pfn..*pfn + PTRS as u64);
                true
            }
            Pmd::Table(t) => {
                for (i, pte) in t.iter_mut().enumerate() {
                    let a = base + i as u64 * PAGE_SIZE;
                    if a < start || a >= end {
                        continue;
                    }
                    if let SimPte::Page { pfn, .. } = *pte {
                        freed.push(pfn);
                    }
                    *pte = SimPte::None;
                }
                t.iter().all(|p| *p == SimPte::None)
            }
        };
        if remove {
            pt.remove(&k);
        }
    }
    freed
}

impl SimMm {
    /// A fresh, empty address space with one user (its process).
    pub fn new() -> Arc<SimMm> {
        Self::with_frames(Arc::new(HostFrames::default()))
    }

    /// A fresh, empty address space whose frames come from `source`.
    pub fn with_frames(source: Arc<dyn FrameSource>) -> Arc<SimMm> {
        Arc::new(SimMm {
            core: MmCore::new(),
            mmap: RwLock::new(SimVmas::default()),
            pt: Mutex::new(HashMap::new()),
            frames: Mutex::new(Frames {
                freed: HashSet::new(),
                in_use: 0,
            }),
            source,
            free_hook: Mutex::new(None),
            fault_hook: Mutex::new(None),
            inject: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
            broken_faults: AtomicBool::new(false),
            faults: AtomicU64::new(0),
            epoch: Instant::now(),
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

    fn free(&self, pfns: Vec<u64>) {
        if pfns.is_empty() {
            return;
        }
        {
            let mut f = self.frames.lock();
            f.in_use -= pfns.len() as u64;
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
    /// telling the notifiers (event `Unmap`).
    pub fn munmap(&self, start: u64, len: u64) -> Result<(), Errno> {
        let end = start + len;
        let mut vmas = mmap_write_lock(self);
        if vmas.overlapping(start, end).iter().any(|v| {
            v.flags.contains(VmFlags::HUGE)
                && (!start.is_multiple_of(PMD_SIZE) || !end.is_multiple_of(PMD_SIZE))
        }) {
            return Err(Errno::EINVAL);
        }
        vmas.split_at(start);
        vmas.split_at(end);
        for v in vmas.overlapping(start, end) {
            vmas.vmas.remove(&v.start);
        }
        let freed = self.zap_range(start, end, MmuNotifyEvent::Unmap);
        drop(vmas);
        self.free(freed);
        Ok(())
    }

    /// `mprotect(start, len, prot)`: replace READ/WRITE/EXEC of the covered
    /// VMAs, write-protecting PTEs when WRITE goes away. Announced even for
    /// upgrades, as Linux does, with [`MmuNotifyEvent::for_mprotect`]'s
    /// event (`ProtectionPage` for read-only, else `ProtectionVma`).
    pub fn mprotect(&self, start: u64, len: u64, prot: VmFlags) -> Result<(), Errno> {
        let end = start + len;
        let perms = VmFlags::READ | VmFlags::WRITE | VmFlags::EXEC;
        let mut vmas = mmap_write_lock(self);
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
        if !prot.contains(VmFlags::WRITE) {
            let mut pt = self.pt.lock();
            for (&k, pmd) in pt.iter_mut() {
                let base = k << PMD_SHIFT;
                match pmd {
                    Pmd::Huge { writable, .. } if base < end && start < base + PMD_SIZE => {
                        *writable = false
                    }
                    Pmd::Huge { .. } => {}
                    Pmd::Table(t) => {
                        for (i, pte) in t.iter_mut().enumerate() {
                            let a = base + i as u64 * PAGE_SIZE;
                            if let SimPte::Page { writable, .. } = pte {
                                if start <= a && a < end {
                                    *writable = false;
                                }
                            }
                        }
                    }
                }
            }
        }
        mmu_notifier_invalidate_range_end(self, &r);
        Ok(())
    }

    /// Page reclaim / migration: drop the translations in `[start, end)`
    /// *without* the mmap lock (event `Clear`), then free the frames. This is
    /// the invalidation that can race with a fault in progress.
    pub fn reclaim(&self, start: u64, end: u64) -> usize {
        let freed = self.zap_range(start, end, MmuNotifyEvent::Clear);
        let n = freed.len();
        self.free(freed);
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
        let freed = zap(&mut self.pt.lock(), start, end);
        mmu_notifier_invalidate_range_end(self, &r);
        let n = freed.len();
        self.free(freed);
        Ok(n)
    }

    fn zap_range(&self, start: u64, end: u64, event: MmuNotifyEvent) -> Vec<u64> {
        let r = MmuNotifierRange {
            start,
            end,
            event,
            blockable: true,
        };
        mmu_notifier_invalidate_range_start(self, &r).expect("blockable");
        let freed = zap(&mut self.pt.lock(), start, end);
        mmu_notifier_invalidate_range_end(self, &r);
        freed
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
            PageState::None => false,
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
        match self.cpu_state(addr) {
            PageState::Present { pfn, writable } => Some((pfn, writable)),
            PageState::Huge { pfn, writable } => {
                Some((pfn + ((addr % PMD_SIZE) >> PAGE_SHIFT), writable))
            }
            PageState::Zero { pfn } => Some((pfn, false)),
            PageState::None | PageState::Special => None,
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
                    PageState::None => (0, false),
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
