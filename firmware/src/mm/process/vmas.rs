//! The VMA tree of one process: non-overlapping `[start, end)` areas keyed by
//! start, split at the edges of an munmap/mprotect and merged with equal
//! neighbours afterwards (so a random mix of operations does not grow it
//! without bound). What the mmap lock protects.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use faultline_driver::mm::{VmFlags, Vma};

use crate::mm::{USER_BASE, USER_END};

/// The VMA tree (`MmapData` of [`super::ProcessMm`]).
#[derive(Default)]
pub struct Vmas {
    map: BTreeMap<u64, Vma>,
}

impl Vmas {
    /// The VMA containing `addr`.
    pub fn lookup(&self, addr: u64) -> Option<Vma> {
        self.map
            .range(..=addr)
            .next_back()
            .map(|(_, v)| *v)
            .filter(|v| v.contains(addr))
    }

    /// Whether any VMA overlaps `[start, end)`. The last VMA starting before
    /// `end` is the only candidate: the ones before it end before it starts.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.map
            .range(..end)
            .next_back()
            .is_some_and(|(_, v)| v.end > start)
    }

    /// Whether VMAs cover `[start, end)` without a hole.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        let mut a = start;
        while a < end {
            match self.lookup(a) {
                Some(v) => a = v.end,
                None => return false,
            }
        }
        true
    }

    /// All VMAs in address order.
    pub fn iter(&self) -> impl Iterator<Item = &Vma> {
        self.map.values()
    }

    /// The VMAs overlapping `[start, end)`.
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = &Vma> {
        let first = self.lookup(start).map_or(start, |v| v.start);
        self.map.range(first..end).map(|(_, v)| v)
    }

    /// The lowest `align`-aligned gap of `len` bytes at or above `from`.
    pub fn find_free(&self, len: u64, align: u64, from: u64) -> Option<u64> {
        let up = |x: u64| x.checked_next_multiple_of(align);
        let mut a = up(from.max(USER_BASE))?;
        for v in self.map.values() {
            if v.end <= a {
                continue;
            }
            if a.checked_add(len)? <= v.start {
                return Some(a);
            }
            a = up(v.end)?;
        }
        (a.checked_add(len)? <= USER_END).then_some(a)
    }

    /// Makes `addr` a VMA boundary.
    fn split_at(&mut self, addr: u64) {
        if let Some(v) = self.lookup(addr) {
            if v.start < addr {
                self.map.insert(v.start, Vma { end: addr, ..v });
                self.map.insert(addr, Vma { start: addr, ..v });
            }
        }
    }

    /// Merges equal neighbours among the VMAs touching `[start, end]`.
    fn merge(&mut self, start: u64, end: u64) {
        // Begin with the VMA that ends at or contains `start` (one that starts
        // there may merge with it), else the first one after.
        let Some(mut cur) = self
            .map
            .range(..start)
            .next_back()
            .map(|(_, v)| *v)
            .filter(|v| v.end >= start)
            .or_else(|| self.map.range(start..).next().map(|(_, v)| *v))
        else {
            return;
        };
        while cur.start <= end {
            let Some(next) = self.map.get(&cur.end).copied() else {
                match self.map.range(cur.end..).next() {
                    Some((_, v)) => {
                        cur = *v;
                        continue;
                    }
                    None => return,
                }
            };
            if next.flags == cur.flags {
                self.map.remove(&next.start);
                cur.end = next.end;
                self.map.insert(cur.start, cur);
            } else {
                cur = next;
            }
        }
    }

    /// Adds a VMA over a range no VMA overlaps.
    pub fn insert(&mut self, vma: Vma) {
        debug_assert!(!self.overlaps(vma.start, vma.end));
        self.map.insert(vma.start, vma);
        self.merge(vma.start, vma.end);
    }

    /// Removes `[start, end)` from the tree; returns the span from the first
    /// removed byte to the last, if anything was mapped there.
    pub fn remove(&mut self, start: u64, end: u64) -> Option<(u64, u64)> {
        if !self.overlaps(start, end) {
            return None;
        }
        self.split_at(start);
        self.split_at(end);
        let keys: Vec<u64> = self.map.range(start..end).map(|(&k, _)| k).collect();
        let first = *keys.first()?;
        let last_end = self.map[keys.last()?].end;
        for k in keys {
            self.map.remove(&k);
        }
        Some((first, last_end))
    }

    /// Replaces READ/WRITE/EXEC of every VMA in `[start, end)` (which the
    /// caller checked is covered) by `perms`.
    pub fn protect(&mut self, start: u64, end: u64, perms: VmFlags) {
        let mask = VmFlags::READ | VmFlags::WRITE | VmFlags::EXEC;
        self.split_at(start);
        self.split_at(end);
        for v in self.map.range_mut(start..end).map(|(_, v)| v) {
            v.flags = (v.flags - mask) | (perms & mask);
        }
        self.merge(start, end);
    }
}
