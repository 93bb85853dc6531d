//! The user half of one process's x86-64 page tables, read and written
//! through the direct map. Every function here expects the caller to hold
//! the process's page-table lock (`ProcessMm::pt`).
//!
//! Leaves carry U (user), A (and D when writable) preset, so the CPU never
//! has to write accessed/dirty bits back (one trap fewer under shadow
//! paging), and NX unless the mapping is executable. PROT_NONE keeps the
//! frame: the entry loses P and gains the software bit [`PROTNONE`], with
//! the address left in place, as Linux's `_PAGE_PROTNONE`.
//!
//! Swap-type entries (P and PROTNONE clear, the software bit [`SWP`] set)
//! hold no frame: a device-private entry keeps the device page's VRAM
//! offset in the address bits, the owner id in bits 52..61 and the write
//! permission in W ([`CpuDevicePrivate`], the encoding the device's
//! coherence checker reads); a migration entry ([`SWP_MIGRATION`]) holds
//! nothing. They exist at the 4 KiB level and, with PS set, at the 2 MiB
//! level (a PDE in a HUGE VMA: a 2 MiB device page, or a 2 MiB page under
//! migration).
//!
//! A device-exclusive entry ([`CpuExclusive`], software bit 8) is not swap-type:
//! like PROT_NONE it keeps its frame (and the owner id in bits 52..61), so
//! every path that walks frames (zap, move, teardown) carries or frees it
//! as it does a present page, and an mprotect turns it back into a normal
//! leaf. A CPU fault on it restores the leaf first
//! (`exclusive_entry_restore`).

use alloc::vec::Vec;
use faultline_abi::{CpuDevicePrivate, CpuExclusive};
use faultline_driver::mm::{
    DeviceOwner, PageState, VmFlags, Walk, PAGE_SHIFT, PAGE_SIZE, PMD_SHIFT, PMD_SIZE,
};
use x86_64::PhysAddr;

use super::freed::Freer;
use crate::arch::paging;
use crate::mm::{frames, DIRECT_MAP_BASE, USER_BASE, USER_END};

pub const P: u64 = 1 << 0;
pub const W: u64 = 1 << 1;
pub const U: u64 = 1 << 2;
pub const A: u64 = 1 << 5;
pub const D: u64 = 1 << 6;
pub const PS: u64 = 1 << 7;
/// Software bit (ignored by the CPU, which ignores every bit of a non-present
/// entry): PROT_NONE, frame still owned.
pub const PROTNONE: u64 = CpuDevicePrivate::PROT_NONE;
/// Software bit of a non-present entry: a swap-type entry (device-private,
/// or with [`SWP_MIGRATION`] a migration entry).
pub const SWP: u64 = CpuDevicePrivate::SWAP;
/// With [`SWP`]: a migration entry (the page is being migrated).
pub const SWP_MIGRATION: u64 = CpuDevicePrivate::MIGRATION;
pub const NX: u64 = 1 << 63;
pub const ADDR: u64 = 0x000f_ffff_ffff_f000;

const AGENT_SLOT: usize = index(crate::user::AGENT_BASE, 39);
const _: () = assert!(crate::user::AGENT_BASE == USER_END && AGENT_SLOT == 255);

const fn index(addr: u64, shift: u32) -> usize {
    ((addr >> shift) & 511) as usize
}

/// The first address of the next `1 << shift` block after `addr`.
fn next_block(addr: u64, shift: u32) -> u64 {
    ((addr >> shift) + 1) << shift
}

/// One page-table page owned by a process (or its PML4).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Table(u64);

impl Table {
    /// # Safety
    /// `pa` must be a 4 KiB page-table frame of this process's tables (or
    /// its PML4), reachable through the direct map, written by nothing but
    /// the holder of the process's page-table lock.
    unsafe fn at(pa: u64) -> Table {
        Table(pa)
    }

    fn slot(self, i: usize) -> *mut u64 {
        debug_assert!(i < 512);
        (DIRECT_MAP_BASE + self.0 + i as u64 * 8) as *mut u64
    }

    pub fn get(self, i: usize) -> u64 {
        // SAFETY: `Table::at`'s contract; i < 512 keeps us in the frame.
        unsafe { self.slot(i).read_volatile() }
    }

    pub fn set(self, i: usize, e: u64) {
        // SAFETY: as in `get`; the caller holds the page-table lock, so no
        // other writer races (the CPU's walker only reads: A/D are preset).
        unsafe { self.slot(i).write_volatile(e) }
    }

    /// The first non-zero entry from `i` on: `repe scasq`, one instruction
    /// for the whole scan, where a loop costs several emulated supervisor
    /// instructions per entry and most of a table is empty.
    fn next_used(self, i: usize) -> Option<usize> {
        if i >= 512 {
            return None;
        }
        let left: usize;
        // SAFETY: reads entries `i..512` of this table's frame (`Table::at`'s
        // contract); the ABI leaves the direction flag clear.
        unsafe {
            core::arch::asm!(
                "repe scasq",
                inout("rdi") self.slot(i) => _,
                inout("rcx") 512 - i => left,
                in("rax") 0u64,
                options(nostack, readonly)
            );
        }
        // The scan stops just past the first non-zero entry (or at the
        // end, with every entry zero).
        let last = 511 - left;
        (self.get(last) != 0).then_some(last)
    }

    /// Entries `(index, entry)` that are not zero, in order.
    fn used(self) -> impl Iterator<Item = (usize, u64)> {
        let mut i = 0;
        core::iter::from_fn(move || {
            let u = self.next_used(i)?;
            i = u + 1;
            Some((u, self.get(u)))
        })
    }

    /// The next-level table under entry `i`, if it is a present non-leaf.
    fn child(self, i: usize) -> Option<Table> {
        let e = self.get(i);
        // SAFETY: a present non-leaf entry of our tables points at one of
        // our table frames (only this module writes such entries).
        (e & (P | PS) == P).then(|| unsafe { Table::at(e & ADDR) })
    }
}

/// Whether a leaf entry holds a frame (present, or kept by PROT_NONE or a
/// device-exclusive entry).
pub fn holds_frame(e: u64) -> bool {
    e & (P | PROTNONE) != 0 || is_exclusive(e)
}

/// Whether a leaf entry is a device-exclusive entry.
pub fn is_exclusive(e: u64) -> bool {
    CpuExclusive::decode(e).is_some()
}

/// The entry for [`PageState::Exclusive`] (`None` for other states, or an
/// owner or frame the encoding cannot hold).
pub fn exclusive_entry(state: PageState) -> Option<u64> {
    let PageState::Exclusive {
        owner,
        pfn,
        writable,
    } = state
    else {
        return None;
    };
    CpuExclusive {
        owner: owner.get(),
        frame: pfn.checked_mul(PAGE_SIZE)?,
        writable,
    }
    .encode()
}

/// Whether a leaf entry is a swap-type entry (device-private or migration).
pub fn is_swap(e: u64) -> bool {
    CpuDevicePrivate::is_swap(e)
}

/// The entry for a device-private or migration state (`None` for others),
/// as a PDE (`pmd`: a 2 MiB device page or migration entry) or a PTE.
pub fn swap_entry(state: PageState, pmd: bool) -> Option<u64> {
    let level = if pmd { PS } else { 0 };
    match state {
        PageState::DevicePrivate {
            owner,
            vram_pfn,
            writable,
            huge,
        } if huge == pmd => {
            let entry = CpuDevicePrivate {
                owner: owner.get(),
                vram: vram_pfn.checked_mul(PAGE_SIZE)?,
                writable,
            };
            entry.encode().map(|e| e | level)
        }
        PageState::Migration => Some(SWP | SWP_MIGRATION | level),
        _ => None,
    }
}

/// The device page a device-private entry names: (owner, vram pfn, whether
/// it is a 2 MiB one).
pub fn device_page(e: u64) -> Option<(DeviceOwner, u64, bool)> {
    let d = CpuDevicePrivate::decode(e)?;
    Some((
        DeviceOwner::from_raw(d.owner)?,
        d.vram >> PAGE_SHIFT,
        e & PS != 0,
    ))
}

/// What a swap-type entry (PTE or PDE) says to the mirror layer.
fn swap_state(e: u64) -> PageState {
    if e & SWP_MIGRATION != 0 {
        return PageState::Migration;
    }
    match device_page(e) {
        Some((owner, vram_pfn, huge)) => PageState::DevicePrivate {
            owner,
            vram_pfn,
            writable: e & W != 0,
            huge,
        },
        // Only this module writes swap entries, always with an owner.
        None => PageState::Special,
    }
}

/// What a last-level entry says to the mirror layer.
#[inline]
pub fn pte_state(pte: u64, zero_pa: u64) -> PageState {
    // The common entries first, with one test each: swap-type and
    // exclusive entries are never present, and an empty slot is 0.
    if pte & P != 0 {
        return if pte & ADDR == zero_pa {
            PageState::Zero {
                pfn: zero_pa >> PAGE_SHIFT,
            }
        } else {
            PageState::Present {
                pfn: (pte & ADDR) >> PAGE_SHIFT,
                writable: pte & W != 0,
            }
        };
    }
    if pte == 0 {
        return PageState::None;
    }
    if is_swap(pte) {
        return swap_state(pte);
    }
    if let Some(x) = CpuExclusive::decode(pte) {
        return match DeviceOwner::from_raw(x.owner) {
            Some(owner) => PageState::Exclusive {
                owner,
                pfn: x.frame >> PAGE_SHIFT,
                writable: x.writable,
            },
            // Only this module writes exclusive entries, always with one.
            None => PageState::Special,
        };
    }
    if !holds_frame(pte) {
        PageState::None
    } else if pte & ADDR == zero_pa {
        PageState::Zero {
            pfn: zero_pa >> PAGE_SHIFT,
        }
    } else {
        PageState::Present {
            pfn: (pte & ADDR) >> PAGE_SHIFT,
            writable: pte & (P | W) == (P | W),
        }
    }
}

/// A leaf mapping `pa` with the permissions of `vm`.
pub fn leaf(pa: u64, vm: VmFlags, writable: bool, huge: bool) -> u64 {
    let mut e = pa | P | U | A;
    if writable {
        e |= W | D;
    }
    if huge {
        e |= PS;
    }
    if !vm.contains(VmFlags::EXEC) && paging::nx_enabled() {
        e |= NX;
    }
    e
}

/// `e` after an mprotect to `vm`: PROT_NONE keeps only the frame; otherwise
/// the leaf keeps its write permission only if it had it and `vm` allows it
/// (an upgrade waits for the next write fault, which also keeps the shared
/// zero page read-only).
fn reprotect(e: u64, vm: VmFlags) -> u64 {
    let frame = e & (ADDR | PS);
    if !vm.contains(VmFlags::READ) {
        return frame | PROTNONE | U;
    }
    let writable = e & (P | W) == (P | W) && vm.contains(VmFlags::WRITE);
    leaf(e & ADDR, vm, writable, e & PS != 0)
}

/// Frames to give back after `invalidate_range_end`. A few inline, the rest
/// on the heap: most unmaps free a handful and a heap allocation is not free
/// under PVM.
pub struct FrameList {
    inline: [u64; 8],
    n: usize,
    spill: alloc::vec::Vec<u64>,
    /// Device pages unmapped (owner, page, 2 MiB), for their owners'
    /// `page_free`.
    pub devices: Vec<(DeviceOwner, u64, bool)>,
}

/// Low bits of a [`FrameList`] entry: a 2 MiB run; a page-table page (not
/// process data, so not watched by [`super::freed`]).
const RUN_2M: u64 = 1;
const TABLE: u64 = 2;

impl FrameList {
    pub fn new() -> FrameList {
        FrameList {
            inline: [0; 8],
            n: 0,
            spill: alloc::vec::Vec::new(),
            devices: Vec::new(),
        }
    }

    fn push(&mut self, x: u64) {
        if self.n < self.inline.len() {
            self.inline[self.n] = x;
            self.n += 1;
        } else {
            self.spill.push(x);
        }
    }

    pub fn push_4k(&mut self, pa: u64) {
        self.push(pa);
    }

    pub fn push_2m(&mut self, pa: u64) {
        self.push(pa | RUN_2M);
    }

    pub fn push_table(&mut self, pa: u64) {
        self.push(pa | TABLE);
    }

    pub fn free_all(self) {
        if self.n == 0 {
            return;
        }
        let mut f = Freer::new();
        for &x in self.inline[..self.n].iter().chain(self.spill.iter()) {
            if x & TABLE != 0 {
                f.table(x & !TABLE);
            } else {
                f.data(x & !RUN_2M, x & RUN_2M != 0);
            }
        }
    }
}

/// TLB entries to drop once the page tables changed. Up to 8 pages by
/// `invlpg`, beyond that (or after freeing a page-table page, which may sit
/// in the paging-structure caches) one CR3 reload.
pub struct Flush {
    addrs: [u64; 8],
    n: usize,
    all: bool,
}

impl Flush {
    pub fn new() -> Flush {
        Flush {
            addrs: [0; 8],
            n: 0,
            all: false,
        }
    }

    pub fn page(&mut self, addr: u64) {
        if self.n < self.addrs.len() {
            self.addrs[self.n] = addr;
            self.n += 1;
        } else {
            self.all = true;
        }
    }

    pub fn everything(&mut self) {
        self.all = true;
    }

    /// Performs the flush if the tables are live in CR3. Without PCIDs a
    /// process that is not loaded has nothing cached: loading it flushes.
    pub fn run(&self, active: bool) {
        if !active {
            return;
        }
        if self.all {
            let (frame, flags) = x86_64::registers::control::Cr3::read();
            // SAFETY: reloading the current CR3 value only flushes the TLB.
            unsafe { x86_64::registers::control::Cr3::write(frame, flags) };
        } else {
            for &a in &self.addrs[..self.n] {
                x86_64::instructions::tlb::flush(x86_64::VirtAddr::new(a));
            }
        }
    }
}

/// Out of frames while building the tables.
#[derive(Debug)]
pub struct Oom;

/// A 4 KiB frame, zeroed.
pub fn alloc_zeroed() -> Result<u64, Oom> {
    Ok(frames::alloc_zeroed().ok_or(Oom)?.as_u64())
}

/// A 2 MiB-aligned run of 512 frames, zeroed.
pub fn alloc_zeroed_2m() -> Result<u64, Oom> {
    Ok(frames::alloc_zeroed_2m().ok_or(Oom)?.as_u64())
}

/// The page tables of one process: its PML4 (kernel half shared) and the
/// frame counts.
pub struct PageTables {
    pml4: Table,
    /// Page-table pages below the PML4.
    pub tables: u64,
    /// 4 KiB frames of process memory (a 2 MiB leaf counts 512), the zero
    /// page excluded.
    pub data: u64,
}

impl PageTables {
    /// A PML4 with an empty user half, the kernel's entries 0 and 256..512
    /// (all kernel-half entries exist from boot on, so copying them once is
    /// enough) and the agent's slot 255 (`crate::user`, shared, never freed
    /// here: it lies above `USER_END`).
    pub fn new() -> Result<PageTables, Oom> {
        let pa = alloc_zeroed()?;
        let kernel = paging::kernel_pml4_phys().as_u64();
        // SAFETY: `pa` is our fresh PML4 frame; the kernel PML4 is RAM in the
        // direct map and its kernel half is not written after boot.
        let pml4 = unsafe {
            let dst = (DIRECT_MAP_BASE + pa) as *mut u64;
            let src = (DIRECT_MAP_BASE + kernel) as *const u64;
            dst.write(src.read());
            dst.add(AGENT_SLOT).write(crate::user::agent_pml4e());
            core::ptr::copy_nonoverlapping(src.add(256), dst.add(256), 256);
            Table::at(pa)
        };
        Ok(PageTables {
            pml4,
            tables: 0,
            data: 0,
        })
    }

    pub fn pml4_phys(&self) -> u64 {
        self.pml4.0
    }

    /// The table under `t[i]`, created if missing.
    fn child_or_alloc(&mut self, t: Table, i: usize) -> Result<Table, Oom> {
        if let Some(c) = t.child(i) {
            return Ok(c);
        }
        debug_assert!(t.get(i) & P == 0, "leaf where a table belongs");
        let pa = alloc_zeroed()?;
        self.tables += 1;
        // Permissions are decided at the leaf.
        t.set(i, pa | P | W | U | A);
        // SAFETY: just allocated as a table of this process.
        Ok(unsafe { Table::at(pa) })
    }

    /// The page directory holding `addr`'s PDE, and the index in it.
    pub fn pde(&mut self, addr: u64, create: bool) -> Result<Option<(Table, usize)>, Oom> {
        debug_assert!((USER_BASE..USER_END).contains(&addr));
        let (i4, i3) = (index(addr, 39), index(addr, 30));
        let pd = if create {
            let pdpt = self.child_or_alloc(self.pml4, i4)?;
            self.child_or_alloc(pdpt, i3)?
        } else {
            match self.pml4.child(i4).and_then(|t| t.child(i3)) {
                Some(t) => t,
                None => return Ok(None),
            }
        };
        Ok(Some((pd, index(addr, PMD_SHIFT))))
    }

    /// The page table holding `addr`'s PTE, and the index in it. The PDE
    /// must not be a 2 MiB leaf (4 KiB and 2 MiB mappings never share a
    /// VMA, and unmapping clears both).
    pub fn pte(&mut self, addr: u64, create: bool) -> Result<Option<(Table, usize)>, Oom> {
        let Some((pd, i2)) = self.pde(addr, create)? else {
            return Ok(None);
        };
        let pt = if create {
            self.child_or_alloc(pd, i2)?
        } else {
            match pd.child(i2) {
                Some(t) => t,
                None => return Ok(None),
            }
        };
        Ok(Some((pt, index(addr, PAGE_SHIFT))))
    }

    /// [`PageTables::walk`] for the 4 KiB pages from `addr` on, within its
    /// 2 MiB block, into `out`: one walk to the last-level table, then one
    /// load per page. 0 where `addr`'s block has no last-level table.
    pub fn walk_ptes(&self, addr: u64, zero_pa: u64, out: &mut [PageState]) -> usize {
        if !(USER_BASE..USER_END).contains(&addr) {
            return 0;
        }
        let Some(pd) = self
            .pml4
            .child(index(addr, 39))
            .and_then(|t| t.child(index(addr, 30)))
        else {
            return 0;
        };
        let pde = pd.get(index(addr, PMD_SHIFT));
        if pde & PS != 0 || pde & P == 0 {
            return 0;
        }
        // SAFETY: a present non-leaf PDE of our tables.
        let table = unsafe { Table::at(pde & ADDR) };
        let first = index(addr, PAGE_SHIFT);
        let n = out.len().min(512 - first);
        for (k, slot) in out[..n].iter_mut().enumerate() {
            *slot = pte_state(table.get(first + k), zero_pa);
        }
        n
    }

    /// The software walk the mirror layer uses.
    pub fn walk(&self, addr: u64, zero_pa: u64) -> Walk {
        let hole = Walk {
            state: PageState::None,
            shift: PMD_SHIFT,
        };
        if !(USER_BASE..USER_END).contains(&addr) {
            return hole;
        }
        let Some(pd) = self
            .pml4
            .child(index(addr, 39))
            .and_then(|t| t.child(index(addr, 30)))
        else {
            return hole;
        };
        let pde = pd.get(index(addr, PMD_SHIFT));
        if pde & PS != 0 && holds_frame(pde) {
            return Walk {
                state: PageState::Huge {
                    pfn: (pde & ADDR) >> PAGE_SHIFT,
                    writable: pde & (P | W) == (P | W),
                },
                shift: PMD_SHIFT,
            };
        }
        if is_swap(pde) {
            return Walk {
                state: swap_state(pde),
                shift: PMD_SHIFT,
            };
        }
        if pde & P == 0 {
            return hole;
        }
        // SAFETY: a present non-leaf PDE of our tables.
        let pte = unsafe { Table::at(pde & ADDR) }.get(index(addr, PAGE_SHIFT));
        Walk {
            state: pte_state(pte, zero_pa),
            shift: PAGE_SHIFT,
        }
    }

    /// Calls `f(addr, table, index, huge)` for every leaf holding a frame,
    /// and every swap-type entry, in `[start, end)`, skipping missing tables
    /// a block at a time (`huge`: a PDE; `addr` is then its block's start).
    pub(super) fn for_each_leaf(
        &self,
        start: u64,
        end: u64,
        mut f: impl FnMut(u64, Table, usize, bool),
    ) {
        let mut a = start;
        while a < end {
            let Some(pdpt) = self.pml4.child(index(a, 39)) else {
                a = next_block(a, 39);
                continue;
            };
            let Some(pd) = pdpt.child(index(a, 30)) else {
                a = next_block(a, 30);
                continue;
            };
            let i2 = index(a, PMD_SHIFT);
            let pde = pd.get(i2);
            let block_end = next_block(a, PMD_SHIFT);
            if (pde & PS != 0 && holds_frame(pde)) || is_swap(pde) {
                f(a & !(PMD_SIZE - 1), pd, i2, true);
            } else if pde & P != 0 {
                // SAFETY: a present non-leaf PDE of our tables.
                let pt = unsafe { Table::at(pde & ADDR) };
                let stop = end.min(block_end);
                while a < stop {
                    let i1 = index(a, PAGE_SHIFT);
                    let e = pt.get(i1);
                    if holds_frame(e) || is_swap(e) {
                        f(a, pt, i1, false);
                    }
                    a += PAGE_SIZE;
                }
            }
            a = block_end;
        }
    }

    /// Clears every leaf in `[start, end)`; frames go to `freed` (the zero
    /// page excepted), live translations to `flush`. 2 MiB leaves must lie
    /// wholly inside the range.
    pub fn zap(
        &mut self,
        start: u64,
        end: u64,
        zero_pa: u64,
        freed: &mut FrameList,
        flush: &mut Flush,
    ) {
        let mut data = 0;
        self.for_each_leaf(start, end, |a, t, i, huge| {
            let e = t.get(i);
            t.set(i, 0);
            if is_swap(e) {
                if let Some(d) = device_page(e) {
                    freed.devices.push(d);
                }
                return;
            }
            if e & P != 0 {
                flush.page(a);
            }
            if huge {
                debug_assert!(a >= start && a + PMD_SIZE <= end, "partial 2 MiB zap");
                freed.push_2m(e & ADDR);
                data += 512;
            } else if e & ADDR != zero_pa {
                freed.push_4k(e & ADDR);
                data += 1;
            }
        });
        self.data -= data;
    }

    /// Creates the page tables that [`PageTables::move_range`] of the same
    /// arguments will write to, so that the move itself allocates nothing.
    pub fn prepare_move(&mut self, start: u64, end: u64, to: u64) -> Result<(), Oom> {
        let mut blocks = Vec::new();
        self.for_each_leaf(start, end, |a, _, _, huge| {
            let dst = to + (a - start);
            if blocks.last() != Some(&(dst >> PMD_SHIFT, huge)) {
                blocks.push((dst >> PMD_SHIFT, huge));
            }
        });
        for (block, huge) in blocks {
            let dst = block << PMD_SHIFT;
            if huge {
                self.pde(dst, true)?;
            } else {
                self.pte(dst, true)?;
            }
        }
        Ok(())
    }

    /// Moves every leaf and swap-type entry of `[start, end)` to the same
    /// offset from `to` (mremap): frames and device pages stay with their
    /// entries; the old translations go to `flush`. The ranges do not
    /// overlap, [`PageTables::prepare_move`] ran for them, and 2 MiB
    /// leaves only move between 2 MiB-aligned ranges.
    pub fn move_range(&mut self, start: u64, end: u64, to: u64, flush: &mut Flush) {
        let mut moving = Vec::new();
        self.for_each_leaf(start, end, |a, t, i, huge| {
            let e = t.get(i);
            t.set(i, 0);
            if e & P != 0 {
                flush.page(a);
            }
            moving.push((to + (a - start), e, huge));
        });
        for (dst, e, huge) in moving {
            let slot = if huge {
                self.pde(dst, false)
            } else {
                self.pte(dst, false)
            };
            match slot {
                Ok(Some((t, i))) => t.set(i, e),
                // prepare_move created it; an entry without a table would
                // leak its frame, so say so.
                _ => log::error!("mremap: no page table at {dst:#x}"),
            }
        }
    }

    /// Applies `vm`'s permissions to every leaf in `[start, end)`.
    pub fn protect(&mut self, start: u64, end: u64, vm: VmFlags, flush: &mut Flush) {
        self.for_each_leaf(start, end, |a, t, i, _| {
            let e = t.get(i);
            if is_swap(e) {
                // A device-private page keeps its entry (the VMA's flags
                // guard access); it only loses write.
                if !vm.contains(VmFlags::WRITE) {
                    t.set(i, e & !W);
                }
                return;
            }
            let new = reprotect(e, vm);
            if new != e {
                t.set(i, new);
                if e & P != 0 {
                    flush.page(a);
                }
            }
        });
    }

    /// Frees the page-table pages around `[start, end)` whose span no longer
    /// overlaps any mapping (`in_use(lo, hi)` says whether one does), as
    /// Linux's `free_pgtables` after an unmap. Only tables whose span meets
    /// the range can have lost their last mapping.
    pub fn prune(
        &mut self,
        start: u64,
        end: u64,
        in_use: impl Fn(u64, u64) -> bool,
        freed: &mut FrameList,
        flush: &mut Flush,
    ) {
        let span = |a: u64, shift: u32| {
            let lo = (a >> shift) << shift;
            (lo, lo + (1 << shift))
        };
        // A parent is in use if any child table survived; otherwise ask
        // (its other children, outside the range, may still be used).
        let mut freed_tables = 0;
        let mut a4 = start;
        while a4 < end {
            let i4 = index(a4, 39);
            let (lo4, hi4) = span(a4, 39);
            if let Some(pdpt) = self.pml4.child(i4) {
                let mut kept4 = false;
                let mut a3 = a4;
                while a3 < end.min(hi4) {
                    let i3 = index(a3, 30);
                    let (lo3, hi3) = span(a3, 30);
                    if let Some(pd) = pdpt.child(i3) {
                        let mut kept3 = false;
                        let mut a2 = a3;
                        while a2 < end.min(hi3) {
                            let i2 = index(a2, PMD_SHIFT);
                            let (lo2, hi2) = span(a2, PMD_SHIFT);
                            if let Some(pt) = pd.child(i2) {
                                if in_use(lo2, hi2) {
                                    kept3 = true;
                                } else {
                                    pd.set(i2, 0);
                                    freed.push_table(pt.0);
                                    freed_tables += 1;
                                }
                            }
                            a2 = hi2;
                        }
                        if kept3 || in_use(lo3, hi3) {
                            kept4 = true;
                        } else {
                            pdpt.set(i3, 0);
                            freed.push_table(pd.0);
                            freed_tables += 1;
                        }
                    }
                    a3 = hi3;
                }
                if !kept4 && !in_use(lo4, hi4) {
                    self.pml4.set(i4, 0);
                    freed.push_table(pdpt.0);
                    freed_tables += 1;
                }
            }
            a4 = hi4;
        }
        if freed_tables > 0 {
            self.tables -= freed_tables;
            flush.everything();
        }
    }

    /// Frees every frame and table of the user half right away (teardown:
    /// nobody can be told any more); device pages go to `devices` (their
    /// owners free them). Returns the number of 4 KiB frames.
    pub fn destroy(&mut self, zero_pa: u64, devices: &mut Vec<(DeviceOwner, u64, bool)>) -> u64 {
        let mut n = 0;
        let mut f = Freer::new();
        for i4 in index(USER_BASE, 39)..=index(USER_END - 1, 39) {
            let Some(pdpt) = self.pml4.child(i4) else {
                continue;
            };
            for (i3, _) in pdpt.used() {
                let Some(pd) = pdpt.child(i3) else {
                    continue;
                };
                for (i2, pde) in pd.used() {
                    if pde & PS != 0 && holds_frame(pde) {
                        f.data(pde & ADDR, true);
                        n += 512;
                    } else if let Some(d) = device_page(pde) {
                        devices.push(d);
                    } else if let Some(pt) = pd.child(i2) {
                        for (_, e) in pt.used() {
                            if let Some(d) = device_page(e) {
                                devices.push(d);
                            } else if holds_frame(e) && e & ADDR != zero_pa {
                                f.data(e & ADDR, false);
                                n += 1;
                            }
                        }
                        f.table(pt.0);
                        n += 1;
                    }
                }
                f.table(pd.0);
                n += 1;
            }
            f.table(pdpt.0);
            n += 1;
            self.pml4.set(i4, 0);
        }
        self.tables = 0;
        self.data = 0;
        n
    }

    /// Frees the PML4 itself (after [`PageTables::destroy`]).
    pub fn free_pml4(&mut self) {
        frames::free(PhysAddr::new(self.pml4.0));
    }
}
