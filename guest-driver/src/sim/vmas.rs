//! The VMA tree, which the simulated mmap lock protects.

use std::collections::BTreeMap;
use std::vec::Vec;

use crate::mm::Vma;

/// What the simulated mmap lock protects: the VMA tree.
#[derive(Default)]
pub struct SimVmas {
    pub(super) vmas: BTreeMap<u64, Vma>,
}

impl SimVmas {
    pub(super) fn lookup(&self, addr: u64) -> Option<Vma> {
        self.vmas
            .range(..=addr)
            .next_back()
            .map(|(_, v)| *v)
            .filter(|v| v.contains(addr))
    }

    /// The first VMA ending above `addr`.
    pub(super) fn find(&self, addr: u64) -> Option<Vma> {
        self.lookup(addr)
            .or_else(|| self.vmas.range(addr..).next().map(|(_, v)| *v))
    }

    /// Split VMAs so that `start` and `end` are VMA boundaries.
    pub(super) fn split_at(&mut self, addr: u64) {
        if let Some(v) = self.lookup(addr) {
            if v.start < addr {
                self.vmas.insert(v.start, Vma { end: addr, ..v });
                self.vmas.insert(addr, Vma { start: addr, ..v });
            }
        }
    }

    /// The lowest `align`-aligned gap of `len` bytes from 256 MiB up (the
    /// mm's own choice of an address, for mremap).
    pub(super) fn find_free(&self, len: u64, align: u64) -> Option<u64> {
        let mut a: u64 = 0x1000_0000;
        for v in self.vmas.values() {
            if v.end <= a {
                continue;
            }
            if a.checked_add(len)? <= v.start {
                return Some(a);
            }
            a = v.end.checked_next_multiple_of(align)?;
        }
        a.checked_add(len).map(|_| a)
    }

    pub(super) fn overlapping(&self, start: u64, end: u64) -> Vec<Vma> {
        self.vmas
            .values()
            .filter(|v| v.start < end && start < v.end)
            .copied()
            .collect()
    }
}
