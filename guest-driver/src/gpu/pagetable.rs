//! Device page tables in DMA memory (4 levels, 512 entries, 48-bit VA).
//!
//! A [`PageTable`] only edits memory: it never talks to the device. Whoever
//! downgrades or removes a leaf the device may have cached must invalidate
//! the device TLB afterwards (see `Context::invalidate`). Tables emptied or
//! replaced are not freed until the page table is dropped (the device may be
//! walking them right now, or hold them in its paging-structure cache until
//! an invalidation covers them: docs/gpu-abi.md, "TLB and invalidation"),
//! which bounds the memory to what the VA range ever needed.

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;

use faultline_abi::{
    level_shift, pt_index, Pte, LEAF_1G, LEAF_2M, LEAF_4K, PTE_ADDR_MASK, VA_LIMIT,
};

use super::{DmaRegion, GpuError, Platform};

/// The leaf bits a caller may ask for: permissions and the aperture.
const LEAF_PERMS: Pte = Pte::WRITE.union(Pte::ATOMIC).union(Pte::VRAM);

/// Leaf sizes the driver maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSize {
    /// 4 KiB leaf (level 1).
    Size4K,
    /// 2 MiB leaf (level 2).
    Size2M,
    /// 1 GiB leaf (level 3).
    Size1G,
}

impl PageSize {
    /// Bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => LEAF_4K,
            PageSize::Size2M => LEAF_2M,
            PageSize::Size1G => LEAF_1G,
        }
    }
    /// Page-table level holding this leaf.
    pub const fn level(self) -> u32 {
        match self {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        }
    }
    fn from_level(level: u32) -> PageSize {
        match level {
            1 => PageSize::Size4K,
            2 => PageSize::Size2M,
            _ => PageSize::Size1G,
        }
    }
}

/// One translation as the device would see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// Address `va` translates to (not the leaf base): guest-physical, or a
    /// VRAM offset for a leaf with `Pte::VRAM`.
    pub phys: u64,
    /// Size of the leaf that maps it.
    pub size: PageSize,
    /// The leaf's permission bits (VALID, WRITE, ATOMIC) and VRAM (then
    /// `phys` is an offset in the device's VRAM).
    pub perms: Pte,
}

/// What [`PageTable::unmap_range`] removed (or [`PageTable::protect_range`]
/// downgraded): what the device TLB must forget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cleared {
    /// Leaves cleared (or downgraded).
    pub leaves: u64,
    /// Smallest range covering every such leaf (empty if none): a leaf
    /// larger than the request is changed whole, so this may exceed it.
    pub start: u64,
    /// End of that range.
    pub end: u64,
}

/// A device page table owned by the driver.
pub struct PageTable<P: Platform> {
    platform: Arc<P>,
    root: u64,
    /// Every linked table, the root included, in slots that never move
    /// (a retired table leaves its slot empty).
    arena: Vec<Option<DmaRegion>>,
    /// Slot of each linked table, by guest-physical address.
    slots: BTreeMap<u64, usize>,
    /// Tables no entry points to any more; freed on drop.
    retired: Vec<DmaRegion>,
    leaves: u64,
    /// The level-1 table of the latest 4 KiB `map`: (va >> 21, its slot).
    /// Faults map runs of neighbouring pages, and where the driver runs
    /// emulated (PVM) the walk from the root and the address lookups are
    /// most of a map's cost. Cleared whenever a table is unlinked or
    /// replaced by a larger leaf.
    last_l1: Option<(u64, usize)>,
}

impl<P: Platform> PageTable<P> {
    /// An empty page table (a zeroed root).
    pub fn new(platform: Arc<P>) -> Result<Self, GpuError> {
        let root = platform.dma_alloc(1).ok_or(GpuError::NoMemory)?;
        let phys = root.phys();
        Ok(PageTable {
            platform,
            root: phys,
            arena: vec![Some(root)],
            slots: BTreeMap::from([(phys, 0)]),
            retired: Vec::new(),
            leaves: 0,
            last_l1: None,
        })
    }

    /// Guest-physical address of the level-4 table (the context's root).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Valid leaves currently present.
    pub fn leaf_count(&self) -> u64 {
        self.leaves
    }

    /// Tables (including the root) this page table holds in DMA memory.
    pub fn table_count(&self) -> usize {
        self.slots.len() + self.retired.len()
    }

    fn slot(&self, phys: u64) -> usize {
        // Only this type writes table entries, and every table address it
        // writes is a key of `slots`.
        *self
            .slots
            .get(&phys)
            .unwrap_or_else(|| panic!("page table {phys:#x} is not ours"))
    }

    fn at(&self, slot: usize) -> &DmaRegion {
        self.arena[slot]
            .as_ref()
            .unwrap_or_else(|| panic!("page-table slot {slot} was retired"))
    }

    fn table(&self, phys: u64) -> &DmaRegion {
        self.at(self.slot(phys))
    }

    fn alloc_table(&mut self) -> Result<u64, GpuError> {
        let t = self.platform.dma_alloc(1).ok_or(GpuError::NoMemory)?;
        let phys = t.phys();
        self.slots.insert(phys, self.arena.len());
        self.arena.push(Some(t));
        Ok(phys)
    }

    /// Unlinks the level-`level` table at `phys` and everything below it.
    fn retire(&mut self, phys: u64, level: u32) {
        self.last_l1 = None;
        if let Some(t) = self.slots.remove(&phys).and_then(|s| self.arena[s].take()) {
            for i in 0..512 {
                let e = Pte::from_bits_retain(t.read_u64(i * 8));
                if e.contains(Pte::VALID) {
                    if level > 1 && !e.contains(Pte::LEAF) {
                        self.retire(e.addr(), level - 1);
                    } else {
                        self.leaves -= 1;
                    }
                }
            }
            self.retired.push(t);
        }
    }

    #[inline]
    fn check(va: u64, phys: u64, size: PageSize) -> Result<(), GpuError> {
        // Leaf sizes are powers of two: a mask, not a division.
        let low = size.bytes() - 1;
        if (va | phys) & low != 0 {
            return Err(GpuError::Invalid("misaligned mapping"));
        }
        if va >= VA_LIMIT || phys & !PTE_ADDR_MASK != 0 {
            return Err(GpuError::Invalid("address out of range"));
        }
        Ok(())
    }

    /// Maps `va` to `phys` with one leaf of `size`; `perms` may hold WRITE,
    /// ATOMIC and VRAM (then `phys` is an offset in the device's VRAM). Replaces whatever mapped that range before (a smaller
    /// leaf's table or a larger leaf is dropped whole); the caller
    /// invalidates the device TLB if that removed or downgraded anything.
    pub fn map(&mut self, va: u64, phys: u64, size: PageSize, perms: Pte) -> Result<(), GpuError> {
        Self::check(va, phys, size)?;
        let level = size.level();
        let cached = match self.last_l1 {
            Some((block, t)) if level == 1 && block == va >> level_shift(2) => Some(t),
            _ => None,
        };
        if level > 1 {
            // This leaf may replace the cached table.
            self.last_l1 = None;
        }
        let mut table = self.root;
        let walk = if cached.is_some() { 1..1 } else { level + 1..5 };
        for l in walk.rev() {
            let slot = pt_index(va, l) * 8;
            let e = Pte::from_bits_retain(self.table(table).read_u64(slot));
            table = if e.contains(Pte::VALID) && !e.contains(Pte::LEAF) {
                e.addr()
            } else {
                if e.contains(Pte::VALID) {
                    // A larger leaf covers this VA: it goes away whole.
                    self.leaves -= 1;
                }
                let t = self.alloc_table()?;
                self.table(table).write_u64(slot, Pte::table(t).bits());
                t
            };
        }
        let t = match cached {
            Some(s) => s,
            None => self.slot(table),
        };
        if level == 1 {
            self.last_l1 = Some((va >> level_shift(2), t));
        }
        let slot = pt_index(va, level) * 8;
        let t = self.at(t);
        let old = Pte::from_bits_retain(t.read_u64(slot));
        let perms = perms & LEAF_PERMS;
        t.write_u64(slot, Pte::leaf(phys, level, perms).bits());
        if old.contains(Pte::VALID) {
            if level > 1 && !old.contains(Pte::LEAF) {
                self.retire(old.addr(), level - 1);
                self.leaves += 1;
            }
        } else {
            self.leaves += 1;
        }
        Ok(())
    }

    /// Maps the `n` pages of `size` from `va` on that `leaf(i)` gives a
    /// (frame, perms) for, as [`PageTable::map`] would one by one; 4 KiB
    /// leaves sharing a level-1 table are written with one walk for the
    /// table. Stops at the first error; returns the leaves written and the
    /// error, if any.
    pub fn map_run(
        &mut self,
        va: u64,
        n: usize,
        size: PageSize,
        mut leaf: impl FnMut(usize) -> Option<(u64, Pte)>,
    ) -> (u64, Result<(), GpuError>) {
        let step = size.bytes();
        // Checked once for the whole run (the per-leaf loop below relies
        // on it): every VA of the run is then aligned too.
        if va & (step - 1) != 0 {
            return (0, Self::check(va, 0, size));
        }
        let mut mapped = 0;
        let mut i = 0;
        while i < n {
            let a = va + i as u64 * step;
            // A 4 KiB leaf in the level-1 table of the last map is written
            // by the loop below with the rest of that table's run; any
            // other leaf takes the walk, which caches its level-1 table.
            let cached = self
                .last_l1
                .filter(|&(block, _)| size == PageSize::Size4K && block == a >> level_shift(2));
            let (slot, first) = match cached {
                Some((_, slot)) => (slot, pt_index(a, 1)),
                None => {
                    i += 1;
                    let Some((phys, perms)) = leaf(i - 1) else {
                        continue;
                    };
                    if let Err(e) = self.map(a, phys, size, perms) {
                        return (mapped, Err(e));
                    }
                    mapped += 1;
                    match self.last_l1 {
                        Some((_, slot)) if size == PageSize::Size4K => (slot, pt_index(a, 1) + 1),
                        _ => continue,
                    }
                }
            };
            // The rest of this level-1 table: its entries are 4 KiB leaves
            // or empty, so a write replaces at most one leaf.
            let t = self.at(slot);
            let mut added = 0;
            let mut result = Ok(());
            // Only the frame needs checking per leaf: these VAs lie in the
            // 2 MiB block of a leaf `map` accepted, 4 KiB apart from `va`,
            // whose alignment that `map` checked too.
            for idx in first..512 {
                if i == n {
                    break;
                }
                i += 1;
                let Some((phys, perms)) = leaf(i - 1) else {
                    continue;
                };
                if phys & !PTE_ADDR_MASK != 0 {
                    let a = va + (i - 1) as u64 * step;
                    result = Self::check(a, phys, size);
                    break;
                }
                let old = Pte::from_bits_retain(t.read_u64(idx * 8));
                let perms = perms & LEAF_PERMS;
                t.write_u64(idx * 8, Pte::leaf(phys, 1, perms).bits());
                added += u64::from(!old.contains(Pte::VALID));
                mapped += 1;
            }
            self.leaves += added;
            if result.is_err() {
                return (mapped, result);
            }
        }
        (mapped, Ok(()))
    }

    /// Maps `[va, va + len)` to `[phys, ..)` with leaves of `size`.
    pub fn map_range(
        &mut self,
        va: u64,
        phys: u64,
        len: u64,
        size: PageSize,
        perms: Pte,
    ) -> Result<(), GpuError> {
        if !len.is_multiple_of(size.bytes()) || va.checked_add(len).is_none_or(|e| e > VA_LIMIT) {
            return Err(GpuError::Invalid("bad mapping length"));
        }
        let mut off = 0;
        while off < len {
            self.map(va + off, phys + off, size, perms)?;
            off += size.bytes();
        }
        Ok(())
    }

    /// The translation of `va`, if a valid leaf maps it.
    pub fn lookup(&self, va: u64) -> Option<Leaf> {
        if va >= VA_LIMIT {
            return None;
        }
        let mut table = self.root;
        for level in (1..=4).rev() {
            let e = Pte::from_bits_retain(self.table(table).read_u64(pt_index(va, level) * 8));
            if !e.contains(Pte::VALID) {
                return None;
            }
            if level == 1 || e.contains(Pte::LEAF) {
                let size = PageSize::from_level(level);
                return Some(Leaf {
                    phys: e.addr() + (va & (size.bytes() - 1)),
                    size,
                    perms: e & (Pte::VALID | LEAF_PERMS),
                });
            }
            table = e.addr();
        }
        None
    }

    /// Whether any valid leaf overlaps `[start, end)`.
    pub fn has_leaves(&self, start: u64, end: u64) -> bool {
        let mut a = start & !(LEAF_4K - 1);
        while a < end.min(VA_LIMIT) {
            match self.lookup(a) {
                Some(_) => return true,
                None => a = self.next_candidate(a),
            }
        }
        false
    }

    /// The next VA after `va` that a leaf could map, skipping the whole
    /// span of a missing table.
    fn next_candidate(&self, va: u64) -> u64 {
        let mut table = self.root;
        for level in (1..=4).rev() {
            let span = 1u64 << level_shift(level);
            let e = Pte::from_bits_retain(self.table(table).read_u64(pt_index(va, level) * 8));
            if !e.contains(Pte::VALID) || level == 1 || e.contains(Pte::LEAF) {
                return (va & !(span - 1)) + span;
            }
            table = e.addr();
        }
        va + LEAF_4K
    }

    /// Unmaps everything: the root's entries are cleared and every table
    /// below it is retired unread (freed on drop, as an unlinked table
    /// always is), so the cost is the root's 512 entries however much was
    /// mapped. Returns the leaves removed. The caller invalidates the whole
    /// context in the device (its TLB and walk caches may still hold the
    /// retired tables) before relying on the device not reaching them.
    pub fn clear(&mut self) -> u64 {
        self.last_l1 = None;
        let root = self.at(0);
        for i in 0..512 {
            if root.read_u64(i * 8) != 0 {
                root.write_u64(i * 8, 0);
            }
        }
        for t in self.arena.drain(1..).flatten() {
            self.retired.push(t);
        }
        self.slots.clear();
        self.slots.insert(self.root, 0);
        core::mem::take(&mut self.leaves)
    }

    /// Clears every leaf overlapping `[start, end)` (whole leaves, even if
    /// they extend past the range). Empty tables stay linked.
    pub fn unmap_range(&mut self, start: u64, end: u64) -> Cleared {
        let c = self.edit_leaves(start, end, &mut |_| Some(Pte::empty()));
        self.leaves -= c.leaves;
        c
    }

    /// Clears WRITE and ATOMIC on every leaf overlapping `[start, end)`
    /// (whole leaves) and keeps it mapped; returns the leaves it downgraded
    /// (read-only ones are left alone and not counted).
    pub fn protect_range(&mut self, start: u64, end: u64) -> Cleared {
        let rw = Pte::WRITE | Pte::ATOMIC;
        self.edit_leaves(start, end, &mut |e| e.intersects(rw).then(|| e - rw))
    }

    /// Offers every valid leaf overlapping `[start, end)` to `edit`; where
    /// it returns a new entry, that entry is written and the leaf counted.
    fn edit_leaves(
        &self,
        start: u64,
        end: u64,
        edit: &mut impl FnMut(Pte) -> Option<Pte>,
    ) -> Cleared {
        let mut c = Cleared {
            leaves: 0,
            start: u64::MAX,
            end: 0,
        };
        let end = end.min(VA_LIMIT);
        if start < end {
            self.edit_in(self.root, 4, 0, start..end, edit, &mut c);
        }
        if c.leaves == 0 {
            c.start = 0;
        }
        c
    }

    fn edit_in(
        &self,
        table: u64,
        level: u32,
        base: u64,
        range: Range<u64>,
        edit: &mut impl FnMut(Pte) -> Option<Pte>,
        c: &mut Cleared,
    ) {
        let span = 1u64 << level_shift(level);
        let first = ((range.start.max(base) - base) / span) as usize;
        let last = ((range.end - 1).min(base + 512 * span - 1) - base) / span;
        let t = self.table(table);
        for i in first..=last as usize {
            let e = Pte::from_bits_retain(t.read_u64(i * 8));
            if !e.contains(Pte::VALID) {
                continue;
            }
            let va = base + i as u64 * span;
            if level == 1 || e.contains(Pte::LEAF) {
                if let Some(new) = edit(e) {
                    t.write_u64(i * 8, new.bits());
                    c.leaves += 1;
                    c.start = c.start.min(va);
                    c.end = c.end.max(va + span);
                }
            } else {
                self.edit_in(e.addr(), level - 1, va, range.clone(), edit, c);
            }
        }
    }
}

impl<P: Platform> Drop for PageTable<P> {
    fn drop(&mut self) {
        for t in self.arena.drain(..).flatten() {
            self.platform.dma_free(t);
        }
        for t in self.retired.drain(..) {
            self.platform.dma_free(t);
        }
    }
}
