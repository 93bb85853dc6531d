//! Where the simulated address space's frames come from ([`FrameSource`],
//! by default [`HostFrames`]) and how many it holds.

use std::boxed::Box;
use std::collections::{HashMap, HashSet};

use parking_lot::Mutex;

use crate::mm::PAGE_SIZE;

/// The zero page's frame with the default [`FrameSource`].
pub const ZERO_PFN: u64 = 0x10;
/// First frame handed out by the allocator (2 MiB aligned).
const FIRST_PFN: u64 = 0x1000;

pub(super) struct Frames {
    pub(super) freed: HashSet<u64>,
    pub(super) in_use: u64,
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

/// Extra references of the frames a forked family shares (pfn → PTEs
/// beyond the first), one table per family: only a fork adds one, every
/// free drops one first ([`SharedFrames::drop_ref`]).
#[derive(Default)]
pub(super) struct SharedFrames(Mutex<HashMap<u64, u32>>);

impl SharedFrames {
    /// One more PTE maps each of `pfns`.
    pub(super) fn share(&self, pfns: impl IntoIterator<Item = u64>) {
        let mut m = self.0.lock();
        for p in pfns {
            *m.entry(p).or_insert(0) += 1;
        }
    }

    /// Whether another PTE maps `pfn` too.
    pub(super) fn is_shared(&self, pfn: u64) -> bool {
        self.0.lock().contains_key(&pfn)
    }

    /// Drops a reference of `pfn` if it has extra ones: `true` when
    /// another PTE still maps it (not to be freed).
    pub(super) fn drop_ref(&self, pfn: u64) -> bool {
        let mut m = self.0.lock();
        let Some(n) = m.get_mut(&pfn) else {
            return false;
        };
        *n -= 1;
        if *n == 0 {
            m.remove(&pfn);
        }
        true
    }

    /// Frames with extra references.
    pub(super) fn len(&self) -> usize {
        self.0.lock().len()
    }
}
