//! The VMAs of one process: non-overlapping `[start, end)` areas, split at
//! the edges of an munmap/mprotect and merged with equal neighbours
//! afterwards (so a random mix of operations does not grow the list without
//! bound). What the mmap lock protects.
//!
//! A sorted vector rather than a tree: lookups are a binary search and an
//! insert or removal is one `memmove`, which is a single `rep movs` — under
//! an instruction-emulating hypervisor far cheaper than a B-tree's node
//! juggling, and processes here have tens of VMAs, not thousands.

use alloc::vec::Vec;

use faultline_driver::mm::{VmFlags, Vma};

use crate::mm::{USER_BASE, USER_END};

/// The VMA list (`MmapData` of [`super::ProcessMm`]), sorted by address.
#[derive(Default, Clone)]
pub struct Vmas {
    v: Vec<Vma>,
}

impl Vmas {
    /// Index of the first VMA ending after `addr` (the one containing it, if
    /// any, else the next one).
    fn first_after(&self, addr: u64) -> usize {
        self.v.partition_point(|x| x.end <= addr)
    }

    /// The VMA containing `addr`.
    pub fn lookup(&self, addr: u64) -> Option<Vma> {
        self.v
            .get(self.first_after(addr))
            .filter(|x| x.start <= addr)
            .copied()
    }

    /// The first VMA ending above `addr` (containing it, or the next one).
    pub fn find(&self, addr: u64) -> Option<Vma> {
        self.v.get(self.first_after(addr)).copied()
    }

    /// Whether any VMA overlaps `[start, end)`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.v
            .get(self.first_after(start))
            .is_some_and(|x| x.start < end)
    }

    /// Whether VMAs cover `[start, end)` without a hole.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        let mut a = start;
        for x in &self.v[self.first_after(start)..] {
            if a >= end {
                break;
            }
            if x.start > a {
                return false;
            }
            a = x.end;
        }
        a >= end
    }

    /// All VMAs in address order.
    pub fn iter(&self) -> impl Iterator<Item = &Vma> {
        self.v.iter()
    }

    /// The VMAs overlapping `[start, end)`.
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = &Vma> {
        self.v[self.first_after(start)..]
            .iter()
            .take_while(move |x| x.start < end)
    }

    /// The lowest `align`-aligned gap of `len` bytes at or above `from`.
    pub fn find_free(&self, len: u64, align: u64, from: u64) -> Option<u64> {
        let up = |x: u64| x.checked_next_multiple_of(align);
        let mut a = up(from.max(USER_BASE))?;
        for x in &self.v[self.first_after(a)..] {
            if a.checked_add(len)? <= x.start {
                return Some(a);
            }
            a = up(x.end)?;
        }
        (a.checked_add(len)? <= USER_END).then_some(a)
    }

    /// Makes `addr` a VMA boundary.
    fn split_at(&mut self, addr: u64) {
        let i = self.first_after(addr);
        if let Some(x) = self.v.get(i).copied() {
            if x.start < addr {
                self.v[i].end = addr;
                self.v.insert(i + 1, Vma { start: addr, ..x });
            }
        }
    }

    /// The index range of the VMAs inside `[start, end)` (both boundaries).
    fn span(&self, start: u64, end: u64) -> (usize, usize) {
        let i = self.first_after(start);
        let n = self.v[i..].iter().take_while(|x| x.start < end).count();
        (i, i + n)
    }

    /// Merges equal, touching neighbours across the boundaries of the VMAs
    /// `first..=last` (the ones just changed; the rest is already merged).
    fn merge(&mut self, first: usize, mut last: usize) {
        let mut k = first.saturating_sub(1);
        while k <= last && k + 1 < self.v.len() {
            let (a, b) = (self.v[k], self.v[k + 1]);
            if a.end == b.start && a.flags == b.flags {
                self.v[k].end = b.end;
                self.v.remove(k + 1);
                if k < last {
                    last -= 1;
                }
            } else {
                k += 1;
            }
        }
    }

    /// Adds a VMA over a range no VMA overlaps.
    pub fn insert(&mut self, vma: Vma) {
        debug_assert!(!self.overlaps(vma.start, vma.end));
        let i = self.first_after(vma.start);
        self.v.insert(i, vma);
        self.merge(i, i);
    }

    /// Removes `[start, end)`; returns the span from the first removed byte
    /// to the last, if anything was mapped there.
    pub fn remove(&mut self, start: u64, end: u64) -> Option<(u64, u64)> {
        if !self.overlaps(start, end) {
            return None;
        }
        self.split_at(start);
        self.split_at(end);
        let (i, j) = self.span(start, end);
        let span = (self.v[i].start, self.v[j - 1].end);
        self.v.drain(i..j);
        Some(span)
    }

    /// Replaces READ/WRITE/EXEC of every VMA in `[start, end)` (which the
    /// caller checked is covered) by `perms`.
    pub fn protect(&mut self, start: u64, end: u64, perms: VmFlags) {
        let mask = VmFlags::READ | VmFlags::WRITE | VmFlags::EXEC;
        self.split_at(start);
        self.split_at(end);
        let (i, j) = self.span(start, end);
        for x in &mut self.v[i..j] {
            x.flags = (x.flags - mask) | (perms & mask);
        }
        if j > i {
            self.merge(i, j - 1);
        }
    }
}
